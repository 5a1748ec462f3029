"""tgolf.eval: byte accounting of val_bpb (BRIEF §1), window plans, evaluate() on models with known losses."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tgolf.data.tokenizer import ByteTables, build_byte_tables, load_tokenizer
from tgolf.eval.bpb import evaluate, plan_windows, token_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
TOKENIZERS = SHARED / "tokenizers"
SP8192 = TOKENIZERS / "fineweb_8192_bpe.model"  # has byte fallback
SP1024 = TOKENIZERS / "fineweb_1024_bpe.model"  # has none: unseen characters become <unk>
WEB = SHARED / "web"
needs_tok = pytest.mark.skipif(not SP8192.is_file(), reason="shared tokenizers not present")


# ---- byte accounting -----------------------------------------------------------------------------------------------
@needs_tok
def test_token_bytes_hand_checked():
    sp = load_tokenizer(SP8192)
    tables = build_byte_tables(sp)
    # (piece, bytes it stands for after the previous piece): worked out by hand from BRIEF §1.
    seq = [("<s>", 0),        # control: boundary, 0 bytes
           ("▁world", 5),     # leading ▁ right after a boundary (BOS): the space is not counted
           ("▁n", 2),         # leading ▁ after a normal token: 1 + 1
           ("a", 1),
           ("<0xC3>", 1),     # byte fallback: 1 byte each (ï = C3 AF), never 3
           ("<0xAF>", 1),
           ("ve", 2),
           ("’", 3),          # one piece, 3 UTF-8 bytes
           ("<unk>", 0),      # unknown: boundary, 0 bytes
           ("▁next", 4),      # leading ▁ after <unk> (a boundary): not counted
           ("</s>", 0),       # control
           ("▁U", 1),         # after </s>: not counted
           ("▁", 1),          # a bare ▁ after a normal token: just the space
           ("1", 1),
           ("▁–", 4)]         # en dash 3 bytes + the space
    ids = torch.tensor([sp.piece_to_id(p) for p, _ in seq])
    assert ids[8] == sp.unk_id() and ids[0] == 1 and ids[10] == 2
    got = token_bytes(ids[:-1], ids[1:], tables)
    assert got.tolist() == [b for _, b in seq[1:]]
    assert got.dtype == torch.int64 and int(got.sum()) == 26
    assert tables.is_boundary[[0, 1, 2, 3]].all() and not tables.is_boundary[4:].any()
    assert tables.base_bytes[4:260].eq(1).all()  # all 256 byte pieces


@needs_tok
def test_byte_tables_pad_unused_ids():
    tables = build_byte_tables(SP1024, vocab_size=1030)
    assert tables.vocab_size == 1030
    assert tables.is_boundary[1024:].all() and tables.base_bytes[1024:].eq(0).all()
    assert not tables.has_leading_space[1024:].any()


@needs_tok
@pytest.mark.parametrize("model", [SP8192, SP1024])
def test_byte_sum_equals_utf8_length_of_decoded_text(model):
    """On real web text, Σ bytes over a document (after BOS) = UTF-8 length of the normalized text it decodes to."""
    sp = load_tokenizer(model)
    tables = build_byte_tables(sp)
    with (WEB / "c4_en_train_first1000docs.jsonl").open() as f:
        docs = [json.loads(next(f))["text"] for _ in range(120)]
    docs += (WEB / "fineweb_sample10BT_first10docs_oneline.txt").read_text().splitlines()
    checked = 0
    for doc in docs:
        ids = sp.encode(doc)
        if sp.unk_id() in ids:  # <unk> decodes to " ⁇ " but stands for 0 bytes by the contest's rule
            continue
        seq = torch.tensor([1, *ids])
        assert int(token_bytes(seq[:-1], seq[1:], tables).sum()) == len(sp.decode(ids).encode("utf-8")), doc[:60]
        checked += 1
    assert checked >= 40


# ---- window plans --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets, seq_len, stride", [(64, 16, 0), (70, 16, 0), (70, 16, 5), (64, 16, 16),
                                                      (10, 16, 4), (100, 7, 1), (33, 8, 3)])
def test_plan_scores_every_target_once_with_most_context(targets, seq_len, stride):
    starts, scored = plan_windows(targets, seq_len, stride)
    window = min(seq_len, targets)
    counts = np.zeros(targets, dtype=int)
    for s, n in zip(starts, scored):
        assert 0 <= s and s + window <= targets and 0 < n <= window
        for j in range(s + window - n, s + window):  # scored targets: the last n of the window
            counts[j] += 1
            assert j - s >= min(j, seq_len - (stride or seq_len))  # context: at least seq_len - stride tokens
    assert counts.tolist() == [1] * targets
    if stride in (0, seq_len) and targets % seq_len == 0:
        assert starts.tolist() == list(range(0, targets, seq_len)) and set(scored.tolist()) == {seq_len}


def test_plan_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride=20"):
        plan_windows(100, 16, 20)


# ---- evaluate ------------------------------------------------------------------------------------------------------
class KnownLoss(torch.nn.Module):
    """Per-token loss = a function of the target id and of the position in the window (i.e. the context length)."""

    def __init__(self, context_weight: float = 0.0):
        super().__init__()
        self.context_weight = context_weight
        self.calls = 0

    def forward(self, x, y, reduction="mean"):
        assert reduction == "none" and x.shape == y.shape and x.dtype == torch.int64
        self.calls += 1
        pos = torch.arange(x.shape[1], dtype=torch.float32)
        return 0.01 * (y % 97).float() + 0.5 + self.context_weight / (1.0 + pos)


def _tables(vocab: int, seed: int = 0) -> ByteTables:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 5, (vocab,), generator=g).to(torch.int16)
    space = torch.rand(vocab, generator=g) < 0.4
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:3] = True
    base[:3] = 0
    return ByteTables(base, space & ~boundary, boundary)


def _expected(tokens: torch.Tensor, tables: ByteTables) -> tuple[float, float]:
    nll = nbytes = 0.0
    for j in range(1, tokens.numel()):
        prev, t = int(tokens[j - 1]), int(tokens[j])
        nll += 0.01 * (t % 97) + 0.5
        nbytes += int(tables.base_bytes[t]) + int(bool(tables.has_leading_space[t]) and not tables.is_boundary[prev])
    return nll / (tokens.numel() - 1), nll / math.log(2) / nbytes


@pytest.mark.parametrize("stride", [0, 5, 16])
def test_evaluate_exact_bpb(stride):
    vocab, seq_len = 300, 16
    tokens = torch.randint(0, vocab, (16 * 20 + 1,), dtype=torch.int32)
    tables = _tables(vocab)
    model = KnownLoss().train()
    res = evaluate(model, tokens, seq_len, batch_tokens=16 * 6, tables=tables, device="cpu", stride=stride)
    val_loss, val_bpb = _expected(tokens, tables)
    assert res.tokens == 16 * 20
    assert res.val_loss == pytest.approx(val_loss, rel=1e-6)
    assert res.val_bpb == pytest.approx(val_bpb, rel=1e-6)
    assert res.bytes == int(token_bytes(tokens[:-1].long(), tokens[1:].long(), tables).sum())
    assert res.seconds >= 0 and model.training  # training mode restored


def test_sliding_window_uses_long_context():
    """With a loss that falls with context, sliding windows score lower than non-overlapping ones."""
    tokens = torch.randint(0, 300, (16 * 10 + 1,))
    tables = _tables(300)
    plain = evaluate(KnownLoss(1.0), tokens, 16, 64, tables, "cpu", stride=0)
    sliding = evaluate(KnownLoss(1.0), tokens, 16, 64, tables, "cpu", stride=4)
    assert sliding.tokens == plain.tokens == 160 and sliding.bytes == plain.bytes
    assert sliding.val_loss < plain.val_loss
    # first window: positions 0..15; then 36 windows scoring positions 12..15 each
    pos_term = sum(1 / (1 + p) for p in range(16)) + 36 * sum(1 / (1 + p) for p in range(12, 16))
    base = sum(0.01 * (int(t) % 97) + 0.5 for t in tokens[1:])
    assert sliding.val_loss == pytest.approx((base + pos_term) / 160, rel=1e-6)


def test_evaluate_shares_windows_over_ranks():
    """Each rank scores its own windows; the all-reduced sums equal the single-process result."""
    tokens = torch.randint(0, 300, (16 * 13 + 1,))
    tables = _tables(300, seed=1)
    full = evaluate(KnownLoss(), tokens, 16, 48, tables, "cpu", stride=6)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # a group of one: all_reduce is the identity
    try:
        parts = [evaluate(KnownLoss(), tokens, 16, 48, tables, "cpu", rank=r, world_size=3, stride=6)
                 for r in range(3)]
    finally:
        dist.destroy_process_group()
    assert sum(p.tokens for p in parts) == full.tokens and sum(p.bytes for p in parts) == full.bytes
    nll = sum(p.val_loss * p.tokens for p in parts)
    assert nll / full.tokens == pytest.approx(full.val_loss, rel=1e-9)
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        evaluate(KnownLoss(), tokens, 16, 48, tables, "cpu", rank=0, world_size=2)


def test_evaluate_pads_last_batch_to_one_shape():
    shapes = []

    class Recorder(KnownLoss):
        def forward(self, x, y, reduction="mean"):
            shapes.append(tuple(x.shape))
            return super().forward(x, y, reduction)

    tokens = torch.randint(0, 300, (16 * 7 + 1,))
    res = evaluate(Recorder(), tokens, 16, 16 * 3, _tables(300), "cpu")
    assert set(shapes) == {(3, 16)} and res.tokens == 16 * 7


def test_evaluate_real_gpt_matches_mean_loss():
    """The tgolf GPT's per-token losses plug in; with one window per batch, val_loss = the model's mean loss."""
    from tgolf.config import Config
    from tgolf.model import build_model

    cfg = Config(vocab_size=300, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=16)
    model = build_model(cfg).float()
    tokens = torch.randint(0, 300, (16 * 4 + 1,))
    res = evaluate(model, tokens, 16, 64, _tables(300), "cpu")
    with torch.no_grad():
        want = model(tokens[:-1].view(4, 16), tokens[1:].view(4, 16)).item()
    assert res.val_loss == pytest.approx(want, rel=1e-5)


@needs_tok
def test_eval_cli_scores_an_artifact(tmp_path, capsys):
    from tgolf.config import Config
    from tgolf.data.shards import write_shard
    from tgolf.eval.__main__ import main as eval_main
    from tgolf.export import load_artifact, write_artifact
    from tgolf.model import build_model

    cfg = Config(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=32)
    artifact = tmp_path / "model.bin"
    write_artifact(artifact, build_model(cfg), cfg)
    sp = load_tokenizer(SP1024)
    text = (WEB / "fineweb_sample10BT_first10docs_oneline.txt").read_text().splitlines()[:3]
    write_shard(tmp_path / "fineweb_val_000000.bin", [t for doc in text for t in (1, *sp.encode(doc))])
    out = tmp_path / "result.json"
    args = ["--artifact", str(artifact), "--data", str(tmp_path), "--tokenizer", str(SP1024),
            "--val-tokens-limit", "1000", "--eval-stride", "8", "--out", str(out)]
    assert eval_main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["seq_len"] == 32 and printed["eval_stride"] == 8 and printed["tokens"] == 992
    model, _ = load_artifact(artifact)
    val = torch.tensor([t for doc in text for t in (1, *sp.encode(doc))][:993])
    direct = evaluate(model, val, 32, 32 * 8, build_byte_tables(SP1024), "cpu", stride=8)
    assert printed["val_bpb"] == pytest.approx(direct.val_bpb, rel=1e-9)
    assert eval_main(["--artifact", str(artifact), "--data", str(tmp_path / "none")]) == 1
    assert "tokenizer.model: no such file" in capsys.readouterr().err
