"""tgolf.eval.ttt: score-first test-time training scores every target once, trains only on scored tokens, and
equals plain evaluation when it does not train."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tgolf.config import Config
from tgolf.data.tokenizer import ByteTables
from tgolf.eval.bpb import evaluate, plan_windows
from tgolf.eval.ttt import TTTSettings, evaluate_ttt, plan_chunks
from tgolf.model import build_model

VOCAB, SEQ = 300, 16


def tiny_gpt(seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Config(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=SEQ)
    return build_model(cfg).float()


def tables(vocab: int = VOCAB) -> ByteTables:
    g = torch.Generator().manual_seed(3)
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:3] = True
    return ByteTables(torch.randint(1, 4, (vocab,), generator=g).to(torch.int16), torch.rand(vocab, generator=g) < 0.3,
                      boundary)


def settings(**changes) -> TTTSettings:
    """The Config defaults (the records' recipe), changed for tiny CPU runs."""
    base = dict(chunk_tokens=100, lr=0.5, batch_seqs=4, max_seconds=0.0)
    return dataclasses.replace(TTTSettings.from_config(Config()), **{**base, **changes})


def repeated_stream(length: int = 1200, period: int = 200, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (period,), generator=g).repeat(-(-length // period))[:length]


@pytest.mark.parametrize("targets,seq_len,stride,chunk", [(1199, 16, 8, 100), (1000, 16, 0, 64), (37, 16, 5, 10),
                                                          (500, 64, 3, 7), (10, 16, 4, 1000)])
def test_chunks_cover_every_window_and_target_once_in_order(targets, seq_len, stride, chunk):
    starts, scored = plan_windows(targets, seq_len, stride)
    window = min(seq_len, targets)
    chunks = plan_chunks(starts, scored, window, chunk)
    assert chunks[0].first_window == 0 and chunks[-1].end_window == len(starts)
    assert chunks[0].first_target == 0 and chunks[-1].end_target == targets
    for a, b in zip(chunks, chunks[1:]):
        assert a.end_window == b.first_window and a.end_target == b.first_target
        assert a.first_target // chunk < b.first_target // chunk  # one chunk per chunk_tokens span, in order
    for c in chunks:
        assert c.end_target - c.first_target == scored[c.first_window:c.end_window].sum()


@pytest.mark.parametrize("stride", [0, 8])
@pytest.mark.parametrize("no_training", [{"lr": 0.0}, {"epochs": 0}])
def test_without_training_equals_evaluate_and_leaves_the_model(stride, no_training):
    model, tokens = tiny_gpt(), repeated_stream()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = evaluate(model, tokens, SEQ, 64, tables(), "cpu", stride=stride)
    res = evaluate_ttt(model, tokens, SEQ, 64, tables(), "cpu", settings(**no_training), stride=stride)
    assert (res.tokens, res.bytes) == (plain.tokens, plain.bytes) == (1199, int(res.bytes))
    assert res.val_bpb == pytest.approx(plain.val_bpb, rel=1e-12) and res.adapted_chunks == 0
    assert res.chunks == 12 and len(res.chunk_bpb) == 12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adapting_to_repeated_text_lowers_the_score_and_the_last_chunk_is_not_trained():
    model, tokens = tiny_gpt(), repeated_stream()
    plain = evaluate(model, tokens, SEQ, 64, tables(), "cpu", stride=8)
    lines: list[str] = []
    res = evaluate_ttt(model, tokens, SEQ, 64, tables(), "cpu", settings(), stride=8, log=lines.append)
    assert res.adapted_chunks == res.chunks - 1 == 11 and res.tokens == plain.tokens
    assert res.val_bpb < 0.75 * plain.val_bpb  # the stream repeats every 200 tokens: adaptation must pay
    assert res.chunk_bpb[-1] < 0.5 * res.chunk_bpb[0]
    assert 0 < res.adapt_seconds <= res.seconds and model.training  # mode restored
    assert len(lines) == 12 and lines[-1].startswith("ttt chunk 12/12: running val_bpb")


class Recorder(torch.nn.Module):
    """Wraps a GPT and records, for each call, whether it trains and the targets it sees."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, y, reduction="mean"):
        self.calls.append((torch.is_grad_enabled(), y.clone()))
        return self.inner(x, y, reduction)


@pytest.mark.parametrize("stride", [0, 5])
def test_trains_only_on_tokens_already_scored(stride):
    """Token t of the stream is t (all distinct), so a target's value is its position + 1: every training batch's
    targets must lie at or before the last target scored so far (each window's last target is always scored)."""
    n = 700
    model = Recorder(tiny_gpt(vocab=n + 1))
    res = evaluate_ttt(model, torch.arange(n), SEQ, 48, tables(n + 1), "cpu", settings(chunk_tokens=64),
                       stride=stride)
    assert res.adapted_chunks == res.chunks - 1 > 5
    scored_up_to, trained = 0, 0
    for training, y in model.calls:
        if training:
            assert int(y.max()) <= scored_up_to, "trained on a target not yet scored"
            trained += 1
        else:
            scored_up_to = max(scored_up_to, int(y.max()))
    assert trained and scored_up_to == n - 1


def test_a_chunk_score_does_not_depend_on_later_tokens():
    tokens = repeated_stream()
    first = evaluate_ttt(tiny_gpt(), tokens, SEQ, 64, tables(), "cpu", settings(), stride=8)
    changed = tokens.clone()
    changed[650:] = torch.randint(3, VOCAB, (changed.numel() - 650,), generator=torch.Generator().manual_seed(9))
    second = evaluate_ttt(tiny_gpt(), changed, SEQ, 64, tables(), "cpu", settings(), stride=8)
    # chunk c scores targets c*100 .. c*100+99, i.e. tokens up to c*100+100: chunks 0..5 see none of the change
    assert first.chunk_bpb[:6] == second.chunk_bpb[:6] and first.chunk_bpb[6:] != second.chunk_bpb[6:]
    untrained = evaluate_ttt(tiny_gpt(), tokens, SEQ, 64, tables(), "cpu", settings(lr=0.0), stride=8)
    assert first.chunk_bpb[0] == untrained.chunk_bpb[0]  # chunk 0 is scored before any training
    assert first.chunk_bpb[1] != untrained.chunk_bpb[1]


def test_frozen_blocks_stay_and_the_rest_adapts():
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_ttt(model, repeated_stream(400), SEQ, 64, tables(), "cpu", settings(freeze_blocks=1))
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(value, after[name]) == name.startswith("blocks.0."), name
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="freeze_blocks=1"):
        evaluate_ttt(Recorder(model), repeated_stream(400), SEQ, 64, tables(), "cpu", settings(freeze_blocks=1))


def test_time_cap_stops_adaptation_but_scores_everything():
    model, tokens = tiny_gpt(), repeated_stream()
    plain = evaluate(model, tokens, SEQ, 64, tables(), "cpu", stride=8)
    res = evaluate_ttt(model, tokens, SEQ, 64, tables(), "cpu", settings(max_seconds=1e-9), stride=8)
    assert res.adapted_chunks == 0 and res.tokens == plain.tokens
    assert res.val_bpb == pytest.approx(plain.val_bpb, rel=1e-12)


def _rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        model = tiny_gpt()
        res = evaluate_ttt(model, repeated_stream(), SEQ, 64, tables(), "cpu", settings(batch_seqs=3), rank=rank,
                           world_size=world_size, stride=8)
        torch.save({"bpb": res.val_bpb, "tokens": res.tokens, "state": model.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # as tgolf.train.distributed.teardown: gloo aborts some exits without it
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_and_adapt_like_one_process(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = tiny_gpt()
    one = evaluate_ttt(model, repeated_stream(), SEQ, 64, tables(), "cpu", settings(batch_seqs=3), stride=8)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert got["tokens"] == one.tokens and got["bpb"] == pytest.approx(one.val_bpb, rel=1e-4)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got["state"][name], value, rtol=1e-3, atol=1e-4)
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])


def test_needs_a_process_group_for_several_ranks():
    with pytest.raises(RuntimeError, match="evaluate_ttt"):
        evaluate_ttt(tiny_gpt(), repeated_stream(), SEQ, 64, tables(), "cpu", settings(), rank=0, world_size=2)


@pytest.mark.parametrize("field,value", [("ttt_chunk_tokens", 0), ("ttt_batch_seqs", 0), ("ttt_epochs", -1),
                                         ("ttt_lr", -0.1), ("ttt_momentum", 1.0), ("ttt_grad_clip", -1.0),
                                         ("ttt_freeze_blocks", 10), ("ttt_max_seconds", -5.0)])
def test_bad_settings_name_their_field(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value}).validate()


def test_settings_come_from_the_config_and_its_environment_variables():
    from tgolf.config import resolve_config

    cfg = resolve_config(environ={"TTT_ENABLED": "1", "TTT_LR": "0.003", "TTT_FREEZE_BLOCKS": "2"})
    assert cfg.ttt_enabled and TTTSettings.from_config(cfg) == dataclasses.replace(
        TTTSettings.from_config(Config()), lr=0.003, freeze_blocks=2)


def test_eval_cli_runs_ttt_on_an_artifact(tmp_path, capsys, monkeypatch, shared_data):
    from tgolf.data.shards import write_shard
    from tgolf.data.tokenizer import build_byte_tables
    from tgolf.eval.__main__ import main as eval_main
    from tgolf.export import load_artifact, write_artifact

    tokenizer = shared_data / "tokenizers" / "fineweb_1024_bpe.model"
    cfg = Config(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=32)
    artifact = tmp_path / "model.bin"
    write_artifact(artifact, tiny_gpt(vocab=1024), cfg)
    stream = np.tile(np.random.default_rng(0).integers(4, 1024, 300), 3).astype(np.uint16)
    write_shard(tmp_path / "fineweb_val_000000.bin", stream)
    flags = ["--artifact", str(artifact), "--data", str(tmp_path), "--tokenizer", str(tokenizer),
             "--eval-stride", "8", "--ttt-chunk-tokens", "128", "--ttt-lr", "0.3", "--ttt-batch-seqs", "4"]
    assert eval_main([*flags, "--ttt-enabled"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["chunks"] == 7 and printed["adapted_chunks"] == 6 and printed["tokens"] == 896  # whole windows
    model, _ = load_artifact(artifact)
    direct = evaluate_ttt(model, torch.from_numpy(stream[:897].astype(np.int64)), 32, 32 * 16,
                          build_byte_tables(str(tokenizer)), "cpu",
                          settings(chunk_tokens=128, lr=0.3, batch_seqs=4, max_seconds=540.0), stride=8)
    assert printed["val_bpb"] == pytest.approx(direct.val_bpb, rel=1e-6)
    assert eval_main(flags) == 0  # the artifact's setting: no TTT
    assert "chunks" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    monkeypatch.setenv("TTT_ENABLED", "1")  # as for tgolf.train, the environment sets what flags do not
    assert eval_main(flags) == 0 and "chunks" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert eval_main([*flags, "--no-ttt-enabled"]) == 0
    assert "chunks" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert eval_main([*flags, "--ttt-enabled", "--stateful"]) == 1
    assert "choose one" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["reference", "fused"])
def test_ttt_on_a_gpu_under_bf16_autocast(loss):
    """On CUDA the scoring and the training run under bf16 autocast, through the chosen loss's kernels."""
    cfg = Config(vocab_size=VOCAB, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, train_seq_len=SEQ,
                 loss=loss)
    torch.manual_seed(0)
    model, tokens = build_model(cfg).cuda(), repeated_stream()
    plain = evaluate(model, tokens, SEQ, 64, tables(), "cuda", stride=8)
    untrained = evaluate_ttt(model, tokens, SEQ, 64, tables(), "cuda", settings(lr=0.0), stride=8)
    assert untrained.val_bpb == pytest.approx(plain.val_bpb, rel=1e-9) and untrained.tokens == plain.tokens
    adapted = evaluate_ttt(model, tokens, SEQ, 64, tables(), "cuda", settings(), stride=8)
    assert adapted.adapted_chunks == 11 and adapted.val_bpb < 0.75 * plain.val_bpb
