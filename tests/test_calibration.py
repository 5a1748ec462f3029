"""GPTQ calibration on text the model samples itself (tgolf.export.calibration): the samples follow the model's
softcapped logits, split over temperatures and ranks as documented, and calibrate GPTQ without a loader."""
from __future__ import annotations

import pytest
import torch

from tgolf.config import Config, parse_temperatures
from tgolf.data.tokenizer import BOS_ID
from tgolf.export.calibration import sample_sequences, self_generated_batches
from tgolf.model import build_model
from tgolf.train.distributed import DistEnv
from tgolf.train.run import gptq_hessians

TINY = dict(num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=97, logit_softcap=5.0)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(Config(**TINY))
    with torch.no_grad():  # leave the zero-initialised projections so every path carries signal
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_a_cold_sample_is_the_greedy_continuation_of_the_softcapped_logits():
    model = _model()
    ids = sample_sequences(model, 3, 6, temperature=1e-4, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (3, 7) and (ids[:, 0] == BOS_ID).all()
    greedy = torch.full((1, 1), BOS_ID)
    for _ in range(6):  # model.logits: the softcapped logits of every position
        greedy = torch.cat((greedy, model.logits(greedy)[:, -1:].argmax(-1)), dim=1)
    assert (ids == greedy).all()


def test_samples_are_seeded_and_hot_samples_vary():
    model = _model()
    draw = lambda seed: sample_sequences(model, 4, 8, 2.0, torch.Generator().manual_seed(seed))  # noqa: E731
    first = draw(5)
    assert torch.equal(first, draw(5)) and not torch.equal(first, draw(6))
    assert ((0 <= first) & (first < 97)).all() and len(set(first[:, 1:].flatten().tolist())) > 4


def test_sequences_split_over_temperatures_then_ranks(monkeypatch):
    import tgolf.export.calibration as calibration

    drawn = []

    def fake(model, count, length, temperature, generator):
        drawn.append((count, temperature))
        return torch.arange(count * (length + 1)).view(count, length + 1)

    monkeypatch.setattr(calibration, "sample_sequences", fake)
    model = _model()
    # 5 sequences of 4 tokens (17 tokens round up): 3 at 0.5, 2 at 1.5; rank 0 of 2 takes sequences 0, 2, 4
    batches = self_generated_batches(model, 17, 4, [0.5, 1.5], seed=0, rank=0, world_size=2, batch=1)
    assert drawn == [(1, 0.5), (1, 0.5), (1, 1.5)]
    x, y = batches[0]
    assert x.shape == y.shape == (1, 4) and torch.equal(x[:, 1:], y[:, :-1])  # targets: the next tokens
    drawn.clear()
    self_generated_batches(model, 17, 4, [0.5, 1.5], seed=0, rank=1, world_size=2, batch=8)
    assert drawn == [(1, 0.5), (1, 1.5)]
    with pytest.raises(ValueError, match="tokens=0"):
        self_generated_batches(model, 0, 4, [1.0], seed=0)


def test_self_calibration_needs_no_loader_and_gives_second_moments():
    # 1024 x 128: the tied embedding is the one matrix over the small-tensor threshold (65,536 elements)
    cfg = Config(**{**TINY, "vocab_size": 1024, "model_dim": 128}, gptq_tokens=64, gptq_calibration="self",
                 gptq_self_seq_len=16)
    model = build_model(cfg)
    hessians = gptq_hessians(cfg, model, None, 1, DistEnv(0, 1, 0, torch.device("cpu")))
    h = hessians.pop("tok_emb.weight")
    assert not hessians and h.shape == (128, 128) and torch.allclose(h, h.T)
    assert torch.linalg.eigvalsh(h.double()).min() > -1e-6 and h.trace() > 0


def test_too_few_sequences_for_the_ranks_and_bad_fields_are_refused():
    cfg = Config(**TINY, gptq_tokens=32, gptq_calibration="self", gptq_self_seq_len=16)
    with pytest.raises(ValueError, match="cannot give each of the 4 ranks one"):
        gptq_hessians(cfg, _model(), None, 1, DistEnv(0, 4, 0, torch.device("cpu")))
    assert parse_temperatures("0.5, 1.5") == [0.5, 1.5]
    for field, value, message in [("gptq_self_temperatures", "0.8,-1", "gptq_self_temperatures='0.8,-1'"),
                                  ("gptq_self_temperatures", "hot", "gptq_self_temperatures='hot'"),
                                  ("gptq_self_seq_len", 0, "gptq_self_seq_len=0"),
                                  ("gptq_calibration", "val", "gptq_calibration='val'")]:
        with pytest.raises(ValueError, match=message):
            Config(**{field: value}).validate()


def test_reading_training_data_past_the_budget_is_reported():
    from tgolf.train.run import calibration_overrun

    train = Config(max_wallclock_seconds=600.0, gptq_tokens=65536)
    assert calibration_overrun(train, 590.0, 8.0) is None
    assert "took 3.0s more than max_wallclock_seconds=600" in calibration_overrun(train, 595.0, 8.0)
    assert calibration_overrun(Config(max_wallclock_seconds=600.0, gptq_calibration="self"), 595.0, 8.0) is None
    assert calibration_overrun(Config(max_wallclock_seconds=0.0), 595.0, 8.0) is None
