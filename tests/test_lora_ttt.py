"""tgolf.eval.lora_ttt: per-document LoRA test-time training scores every target once, each chunk before training
on it, keeps documents apart (from each other and from their batch), leaves the model as it was."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tgolf.config import Config
from tgolf.data.tokenizer import BOS_ID
from tgolf.eval import lora_ttt
from tgolf.eval.bpb import Totals, evaluate, token_bytes
from tgolf.eval.lora_ttt import LoRASettings, evaluate_lora_ttt, split_documents
from tgolf.model import build_model
from test_ttt import VOCAB, tables  # byte tables with boundary, leading-space and multi-byte tokens

SEQ = 32


def tiny_gpt(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Config(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=SEQ,
                 **changes)
    model = build_model(cfg).float()
    with torch.no_grad():  # wake the zero-initialised output projections, so that every path carries signal
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(std=0.05)
    return model


def settings(**changes) -> LoRASettings:
    """The Config defaults (PR #77's recipe), scaled to tiny CPU runs."""
    base = dict(chunk=8, docs=3, lr=0.05, max_seconds=0.0)
    return dataclasses.replace(LoRASettings.from_config(Config()), **{**base, **changes})


def documents_stream(lengths=(23, 7, 30, 1, 15, 31, 9), seed: int = 1, lead: int = 5) -> torch.Tensor:
    """``lead`` tokens of a document begun before the stream, then documents of the given lengths (BOS
    included), each a short pattern repeated (so adaptation has something to learn)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(3, VOCAB, (lead,), generator=g)]
    for n in lengths:
        pattern = torch.randint(3, VOCAB, (4,), generator=g)
        parts.append(torch.cat([torch.tensor([BOS_ID]), pattern.repeat(n)[: n - 1]]))
    return torch.cat(parts)


def test_documents_split_at_bos_and_cover_every_input():
    tokens = torch.tensor([7, 8, BOS_ID, 9, BOS_ID, BOS_ID, 4, 5, BOS_ID])
    bounds = split_documents(tokens)
    assert bounds.tolist() == [0, 2, 4, 5, 8]  # a BOS in last place is only a target
    assert split_documents(tokens[2:]).tolist() == [0, 2, 3, 6]
    assert np.diff(bounds).sum() == len(tokens) - 1


class _Recording(Totals):
    """Totals that also keep each call's per-token nats and scored mask (what each chunk scored)."""

    def __init__(self, device):
        super().__init__(device)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, nll, nbytes, mask):
        self.calls.append((nll.clone(), mask.clone()))
        super().add(nll, nbytes, mask)


def _per_document_reference(model, tokens: torch.Tensor) -> tuple[float, int, int]:
    """Nats, targets and bytes of every document scored alone in one window (documents shorter than SEQ)."""
    bounds = split_documents(tokens)
    nll_sum, count, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            x, y = tokens[None, lo:hi], tokens[None, lo + 1:hi + 1]
            nll_sum += model(x, y, reduction="none").double().sum().item()
            count += hi - lo
            nbytes += int(token_bytes(x, y, tables()).sum())
    return nll_sum, count, nbytes


@pytest.mark.parametrize("docs", [1, 3, 8])
def test_without_adaptation_each_document_is_scored_alone_once(docs):
    model, tokens = tiny_gpt(), documents_stream()
    res = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(lr=0.0, chunk=SEQ, docs=docs))
    nll, count, nbytes = _per_document_reference(model, tokens)
    plain = evaluate(model, tokens, SEQ, 64, tables(), "cpu")
    assert res.tokens == count == plain.tokens == len(tokens) - 1 and res.bytes == nbytes == plain.bytes
    assert res.val_loss == pytest.approx(nll / count, rel=1e-6)
    assert (res.chunks, res.adapted_chunks, res.unit) == (8, 0, "documents")


def test_adaptation_lowers_the_score_and_leaves_the_model_as_it_was():
    model, tokens = tiny_gpt(), documents_stream(lengths=(60, 45, 52, 38))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    plain = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(lr=0.0))
    adapted = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(lr=0.1))
    assert adapted.val_bpb < plain.val_bpb - 0.05 and adapted.adapted_chunks == adapted.chunks == 5
    assert (adapted.tokens, adapted.bytes) == (plain.tokens, plain.bytes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad == flags[p] for p in model.parameters())
    assert not any(module._forward_hooks for module in model.modules())  # the adapters' hooks are gone


def test_each_chunk_is_scored_before_training_on_it(monkeypatch):
    """Changing a document's tokens from position 28 on (targets 27 on, inside chunk 3 = targets 24..31) changes
    no score before them: not those of chunks 0..2, nor those of targets 24..26, which chunk 3 would have changed
    had it been trained on before it was scored."""
    base = documents_stream(lengths=(41,), lead=0)
    changed = base.clone()
    changed[28:] = torch.randint(3, VOCAB, (len(base) - 28,), generator=torch.Generator().manual_seed(9))
    scores = []
    for tokens in (base, changed):
        recording = _Recording(torch.device("cpu"))
        monkeypatch.setattr(lora_ttt, "Totals", lambda device: recording)
        evaluate_lora_ttt(tiny_gpt(), tokens, SEQ, tables(), "cpu", settings(chunk=8, lr=0.1))
        scores.append([nll[mask] for nll, mask in recording.calls])
    assert len(scores[0]) == 5  # 40 targets in chunks of 8
    for c in range(3):
        torch.testing.assert_close(scores[0][c], scores[1][c], rtol=0, atol=0)
    torch.testing.assert_close(scores[0][3][:3], scores[1][3][:3], rtol=0, atol=0)
    assert not torch.allclose(scores[0][3], scores[1][3]) and not torch.allclose(scores[0][4], scores[1][4])


def test_a_documents_score_does_not_depend_on_its_batch():
    model, tokens = tiny_gpt(), documents_stream()
    alone = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(docs=1))
    together = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(docs=8))
    assert together.val_loss == pytest.approx(alone.val_loss, rel=1e-5)
    assert together.val_bpb < evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(lr=0.0)).val_bpb


def test_documents_longer_than_the_window_keep_their_last_seq_len_tokens_as_context():
    # 70-target documents in chunks of 8 through 32-token windows: every target scored once, the score finite
    model, tokens = tiny_gpt(doc_attention=True), documents_stream(lengths=(71, 70), lead=0)
    res = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(chunk=8))
    assert res.tokens == len(tokens) - 1 and np.isfinite(res.val_bpb)


def test_time_cap_stops_adaptation_but_scores_everything():
    model, tokens = tiny_gpt(), documents_stream()
    res = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(docs=2, max_seconds=1e-9))
    assert res.adapted_chunks == 2 and res.tokens == len(tokens) - 1  # the first batch measures the rate


def test_chunk_longer_than_the_window_is_refused():
    with pytest.raises(ValueError, match="ttt_lora_chunk=64 is longer than the evaluation's seq_len=32"):
        evaluate_lora_ttt(tiny_gpt(), documents_stream(), SEQ, tables(), "cpu", settings(chunk=64))


@pytest.mark.parametrize("field,value", [("ttt_mode", "sgd"), ("ttt_lora_rank", 0), ("ttt_lora_chunk", 0),
                                         ("ttt_lora_docs", 0), ("ttt_lora_lr", -0.1)])
def test_bad_settings_name_their_field(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value}).validate()


def test_a_chunk_longer_than_the_runs_windows_fails_before_training():
    with pytest.raises(ValueError, match="ttt_lora_chunk=512 is longer than the evaluation's windows"):
        Config(ttt_enabled=True, ttt_mode="lora", ttt_lora_chunk=512, train_seq_len=256).validate()
    Config(ttt_enabled=True, ttt_mode="lora", ttt_lora_chunk=512, train_seq_len=256, eval_seq_len=1024).validate()


def _rank_main(rank: int, world: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        res = evaluate_lora_ttt(tiny_gpt(), documents_stream(), SEQ, tables(), "cpu", settings(docs=2), rank=rank,
                                world_size=world)
        torch.save(dataclasses.asdict(res), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # as tgolf.train.distributed.teardown: gloo aborts some exits without it
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_like_one_process(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    one = evaluate_lora_ttt(tiny_gpt(), documents_stream(), SEQ, tables(), "cpu", settings(docs=2))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got["tokens"], got["bytes"], got["chunks"], got["adapted_chunks"]) == (one.tokens, one.bytes, 8, 8)
        assert got["val_loss"] == pytest.approx(one.val_loss, rel=1e-5)


@pytest.mark.parametrize("variant", [dict(linear="ternary"), dict(attention="hybrid", attention_window=8),
                                     dict(tie_embeddings=False, loss="fused"), dict(doc_attention=True)],
                         ids=["ternary", "hybrid", "untied-fused-loss", "doc-attention"])
def test_adapts_every_model_variant(variant):
    """The adapters hook c_q and c_v whatever the layer (ternary, linear attention) and add to whichever head."""
    model, tokens = tiny_gpt(**variant), documents_stream(lengths=(60, 45, 52, 38))
    plain = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(lr=0.0))
    adapted = evaluate_lora_ttt(model, tokens, SEQ, tables(), "cpu", settings(lr=0.1))
    assert adapted.tokens == plain.tokens == len(tokens) - 1 and adapted.val_bpb < plain.val_bpb
