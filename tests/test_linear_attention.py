"""Linear attention: Triton kernels (TRITON_INTERPRET=1 on the CPU) vs the float64 quadratic reference, modules, eval."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tgolf.backend import choose
from tgolf.ops.linear_attention import linear_attention
from tgolf.ops.linear_attention.feature_maps import (FEATURE_MAPS, divide_by_key_sum, make_feature_map,
                                                     with_key_sum)
from tgolf.ops.linear_attention.reference import linear_attention_quadratic, linear_attention_recurrent

TRITON = choose(torch.device("cpu")).backend == "triton"
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton backend unavailable (set TRITON_INTERPRET=1)")
B, T, H, HKV, D = 2, 37, 4, 2, 16  # T is not a multiple of the chunk; GQA 2:1
CHUNK = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_decay(kind: str | None, batch: int = B, seq_len: int = T, heads: int = H) -> torch.Tensor | None:
    if kind == "head":
        return -torch.rand(heads) * 0.3 - 0.01
    if kind == "token":
        return F.logsigmoid(torch.randn(batch, seq_len, heads) + 2.0)
    return None


def run_both(fn, inputs: list[torch.Tensor | None]):
    """fn(*inputs) → tensors, under the op (float32) and the reference (float64); outputs and input grads of each."""
    results = []
    for dtype in (torch.float32, torch.float64):
        leaves = [None if x is None else x.to(dtype).clone().requires_grad_() for x in inputs]
        outs = fn(dtype == torch.float64, *leaves)
        gen = torch.Generator().manual_seed(7)
        loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
                   for o in outs)
        loss.backward()
        results.append((outs, [None if x is None else x.grad for x in leaves]))
    return results


def assert_close(results, tol: float = 2e-5) -> None:
    (outs, grads), (ref_outs, ref_grads) = results
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert torch.isfinite(o).all() and rel(o, r) < tol, f"output {i}: rel err {rel(o, r):.2e}"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is not None:
            assert g is not None and torch.isfinite(g).all() and rel(g, r) < tol, f"grad {i}: rel err {rel(g, r):.2e}"


@needs_triton
@pytest.mark.parametrize("decay_kind", [None, "head", "token"])
def test_matches_reference_with_state(decay_kind):
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, HKV, D), torch.randn(B, T, HKV, D + 4)
    h0 = torch.randn(B, H, D, D + 4)

    def fn(is_ref, q, k, v, g, h0):
        if is_ref:
            return linear_attention_quadratic(q, k, v, decay=g, initial_state=h0, scale=0.25)
        return linear_attention(q, k, v, decay=g, initial_state=h0, output_state=True, scale=0.25,
                                chunk_size=CHUNK)

    assert_close(run_both(fn, [q, k, v, make_decay(decay_kind), h0]))


@needs_triton
def test_bf16_inputs():
    q, k, v = (torch.randn(1, 40, 2, 16).bfloat16() for _ in range(3))
    g = make_decay("token", 1, 40, 2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o = linear_attention(*leaves[:3], decay=leaves[3], chunk_size=CHUNK)
    o.float().square().sum().backward()
    ref = [x.double().requires_grad_() for x in (q, k, v, g)]
    o_ref, _ = linear_attention_quadratic(*ref[:3], decay=ref[3])
    o_ref.square().sum().backward()
    assert o.dtype == torch.bfloat16 and rel(o, o_ref) < 1e-2
    for a, b in zip(leaves, ref):
        assert rel(a.grad, b.grad) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_gpu_matches_reference(dtype, tol):
    cu = torch.tensor([0, 700, 701, 2000], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, 2000, h, 64, device="cuda") for h in (8, 4, 4))
    g, h0 = F.logsigmoid(torch.randn(1, 2000, 8, device="cuda") + 4), torch.randn(3, 8, 64, 64, device="cuda")

    def fn(is_ref, q, k, v, g, h0):
        if is_ref:
            return linear_attention_quadratic(q, k, v, decay=g, cu_seqlens=cu, initial_state=h0, scale=0.125)
        return linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), decay=g, cu_seqlens=cu, initial_state=h0,
                                output_state=True, scale=0.125)

    assert_close(run_both(fn, [q, k, v, g, h0]), tol)


@needs_triton
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_feature_maps_match_reference(feature_map):
    head_dim = 4 if feature_map == "taylor" else 8  # Taylor: 1 + D + D² features
    phi = make_feature_map(feature_map, head_dim)
    q, k, v = torch.randn(1, 29, 2, head_dim), torch.randn(1, 29, 2, head_dim), torch.randn(1, 29, 2, head_dim)

    def fn(is_ref, q, k, v, g):
        phi.double() if is_ref else phi.float()
        vv = with_key_sum(v) if phi.normalize else v
        if is_ref:
            o, _ = linear_attention_quadratic(phi(q), phi(k), vv, decay=g)
        else:
            o = linear_attention(phi(q), phi(k), vv, decay=g, chunk_size=CHUNK)
        return [divide_by_key_sum(o) if phi.normalize else o]

    assert_close(run_both(fn, [q, k, v, make_decay("token", 1, 29, 2)]))


@needs_triton
def test_several_dk_dv_blocks(monkeypatch):
    from tgolf.kernels import linear_attention as kern

    monkeypatch.setattr(kern, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(kern, "MAX_BLOCK_V", 16)
    q, k, v = torch.randn(1, 21, 2, 40), torch.randn(1, 21, 1, 40), torch.randn(1, 21, 1, 24)  # 3 Dk, 2 Dv blocks

    def fn(is_ref, q, k, v, g, h0):
        if is_ref:
            return linear_attention_quadratic(q, k, v, decay=g, initial_state=h0, scale=0.2)
        return linear_attention(q, k, v, decay=g, initial_state=h0, output_state=True, scale=0.2, chunk_size=CHUNK)

    assert_close(run_both(fn, [q, k, v, make_decay("token", 1, 21, 2), torch.randn(1, 2, 40, 24)]))
    o1 = linear_attention(q, k, v, mode="recurrent")
    assert rel(o1, linear_attention_quadratic(q, k, v)[0]) < 1e-5


@needs_triton
def test_only_the_grids_x_grows_with_the_data(monkeypatch):
    """CUDA allows 2³¹−1 blocks along a grid's x but 65,535 along y and z, so only x may grow with the chunks or
    the sequences × heads (else a long evaluation batch fails to launch on the GPU; the interpreter has no limit)."""
    from triton.runtime.interpreter import InterpretedFunction

    grids: dict[str, list[tuple]] = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        grids.setdefault(self.fn.__name__, []).append(tuple(grid))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    for batch, seq_len in ((1, 20), (3, 70)):
        q, k, v = (torch.randn(batch, seq_len, heads, D, requires_grad=True) for heads in (H, HKV, HKV))
        linear_attention(q, k, v, decay=make_decay("token", batch, seq_len), chunk_size=CHUNK).sum().backward()
        linear_attention(q.detach(), k.detach(), v.detach(), mode="recurrent")
    assert len(grids) == 4, sorted(grids)
    for name, launched in grids.items():
        assert len({grid[0] for grid in launched}) > 1, f"{name}: x did not grow: {launched}"
        assert len({grid[1:] for grid in launched}) == 1, f"{name}: y or z grows with the data: {launched}"


def test_reverse_cumsum_restarts_with_every_sequence():
    from tgolf.ops.linear_attention import _reverse_cumsum_per_sequence

    lengths = [3, 0, 5, 1, 4]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    dG = torch.randn(sum(lengths), 3)
    expected = torch.empty_like(dG, dtype=torch.float64)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for t in range(lo, hi):
            expected[t] = dG[t:hi].double().sum(0)
    got = _reverse_cumsum_per_sequence(dG, cu)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_references_agree():
    q, k, v = torch.randn(B, 19, H, 8), torch.randn(B, 19, HKV, 8), torch.randn(B, 19, HKV, 8)
    g, h0 = make_decay("token", seq_len=19), torch.randn(B, H, 8, 8)
    o1, s1 = linear_attention_quadratic(q, k, v, decay=g, initial_state=h0, scale=0.5)
    o2, s2 = linear_attention_recurrent(q, k, v, decay=g, initial_state=h0, scale=0.5)
    assert rel(o1, o2) < 1e-6 and rel(s1, s2) < 1e-6


@needs_triton
@pytest.mark.parametrize("decay_kind", [None, "token"])
def test_chunk_equals_recurrent(decay_kind):
    q, k, v, g = torch.randn(B, T, H, D), torch.randn(B, T, HKV, D), torch.randn(B, T, HKV, D), make_decay(decay_kind)
    h0 = torch.randn(B, H, D, D)
    o1, s1 = linear_attention(q, k, v, decay=g, initial_state=h0, output_state=True, chunk_size=CHUNK)
    o2, s2 = linear_attention(q, k, v, decay=g, initial_state=h0, output_state=True, mode="recurrent")
    assert rel(o1, o2) < 1e-5 and rel(s1, s2) < 1e-5


@needs_triton
def test_two_halves_with_state_equal_one_pass():
    q, k, v, g = torch.randn(B, T, H, D), torch.randn(B, T, HKV, D), torch.randn(B, T, HKV, D), make_decay("token")
    o, s = linear_attention(q, k, v, decay=g, output_state=True, chunk_size=CHUNK)
    cut = 21
    o1, s1 = linear_attention(q[:, :cut], k[:, :cut], v[:, :cut], decay=g[:, :cut], output_state=True,
                              chunk_size=CHUNK)
    o2, s2 = linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], decay=g[:, cut:], initial_state=s1,
                              output_state=True, mode="recurrent")
    assert rel(torch.cat((o1, o2), 1), o) < 1e-5 and rel(s2, s) < 1e-5


@needs_triton
def test_varlen_equals_separate_sequences():
    lengths = [5, 0, 35, 17, 16]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    q, k, v = torch.randn(1, total, H, D), torch.randn(1, total, HKV, D), torch.randn(1, total, HKV, D)
    g, h0 = make_decay("token", 1, total), torch.randn(len(lengths), H, D, D)

    def fn(is_ref, q, k, v, g, h0):
        if is_ref:
            return linear_attention_quadratic(q, k, v, decay=g, cu_seqlens=cu, initial_state=h0)
        return linear_attention(q, k, v, decay=g, cu_seqlens=cu, initial_state=h0, output_state=True,
                                chunk_size=CHUNK)

    assert_close(run_both(fn, [q, k, v, g, h0]))
    o, s = fn(False, q, k, v, g, h0)
    for i, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if hi > lo:
            oi, si = linear_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], decay=g[:, lo:hi],
                                      initial_state=h0[i:i + 1], output_state=True, chunk_size=CHUNK)
            assert rel(o[:, lo:hi], oi) < 1e-6 and rel(s[i:i + 1], si) < 1e-6
        else:
            assert torch.equal(s[i], h0[i])  # an empty sequence passes its state through


@needs_triton
def test_gqa_equals_repeated_heads():
    q, k, v, g = torch.randn(1, T, H, D), torch.randn(1, T, HKV, D), torch.randn(1, T, HKV, D), make_decay("head")
    rep = lambda x: x.repeat_interleave(H // HKV, dim=2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    linear_attention(*leaves, decay=g, chunk_size=CHUNK).sum().backward()
    leaves2 = [x.clone().requires_grad_() for x in (q, k, v)]
    linear_attention(leaves2[0], rep(leaves2[1]), rep(leaves2[2]), decay=g, chunk_size=CHUNK).sum().backward()
    for a, b in zip(leaves, leaves2):
        assert rel(a.grad, b.grad) < 1e-6


def force_segments(monkeypatch, seg: int) -> None:
    """Make the state passes cut every sequence into segments of ``seg`` chunks, whatever the shape."""
    from tgolf.kernels import linear_attention as kern

    monkeypatch.setattr(kern, "segment_chunks", lambda *shape: seg)


@needs_triton
@pytest.mark.parametrize("seg", [1, 2, 3])
@pytest.mark.parametrize("decay_kind", [None, "head", "token"])
def test_segmented_state_passes_match_reference(monkeypatch, seg, decay_kind):
    """Segments over packed sequences of 0 to 5 chunks (some shorter than a segment, one empty), with initial and
    final states: outputs, states and every gradient as the reference, and as the one-walk passes."""
    lengths = [5, 0, 70, 17, 48]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    q, k, v = torch.randn(1, total, H, D), torch.randn(1, total, HKV, D), torch.randn(1, total, HKV, D + 4)
    g, h0 = make_decay(decay_kind, 1, total), torch.randn(len(lengths), H, D, D + 4)

    def fn(is_ref, q, k, v, g, h0):
        if is_ref:
            return linear_attention_quadratic(q, k, v, decay=g, cu_seqlens=cu, initial_state=h0, scale=0.5)
        return linear_attention(q, k, v, decay=g, cu_seqlens=cu, initial_state=h0, output_state=True, scale=0.5,
                                chunk_size=CHUNK)

    whole = run_both(fn, [q, k, v, g, h0])[0]
    force_segments(monkeypatch, seg)
    results = run_both(fn, [q, k, v, g, h0])
    assert_close(results)
    for a, b in zip([*results[0][0], *results[0][1]], [*whole[0], *whole[1]]):
        assert (a is None) == (b is None) and (a is None or rel(a, b) < 1e-6)


@pytest.mark.gpu
def test_gpu_segments_equal_the_whole_walk(monkeypatch):
    """bf16 at a long-context shape (the rule picks segments) against the whole walk."""
    from tgolf.kernels import linear_attention as kern

    assert kern.segment_chunks(2, 8, 64, 64, 2 * 8192 // 64) > 0
    q, k, v = (torch.randn(2, 8192, 8, 64, device="cuda").bfloat16() for _ in range(3))
    g = F.logsigmoid(torch.randn(2, 8192, 8, device="cuda") + 4)

    def run() -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
        o, s = linear_attention(*leaves[:3], decay=leaves[3], output_state=True, scale=0.125)
        (o.float().square().sum() + s.sum()).backward()
        return [o, s, *(x.grad for x in leaves)]

    segmented = run()
    force_segments(monkeypatch, 0)
    for a, b in zip(segmented, run()):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-3


@needs_triton
def test_segment_rule_cuts_only_long_sequences_in_few_programs():
    from tgolf.kernels import linear_attention as kern

    def seg(batch: int, seq_len: int) -> int:  # the benchmark's shapes: 65,536 tokens, 8 heads of 64, chunks of 64
        return kern.segment_chunks(batch, 8, 64, 64, batch * seq_len // 64)

    assert seg(64, 1024) == seg(32, 2048) == seg(16, 4096) == 0  # 512, 256, 256 programs: busy enough already
    assert seg(8, 8192) == seg(4, 16384) == seg(2, 32768) == 32  # 128, 64, 32 programs walking 128 to 512 chunks
    assert seg(1, 4096) == 4 and seg(2, 8192) == 8  # fewer programs, shorter segments: more of them in parallel
    assert seg(2, 1024) == 0 and seg(1, 256) == 0  # walks too short to pay for two more launches


@needs_triton
@pytest.mark.parametrize("segmented", [False, True])
def test_nan_poisoned_outputs_are_fully_written(monkeypatch, segmented):
    from tgolf.kernels import linear_attention as kern

    monkeypatch.setattr(kern, "POISON_OUTPUTS", True)
    if segmented:
        force_segments(monkeypatch, 1)
    cu = torch.tensor([0, 7, 7, 37], dtype=torch.int32)
    leaves = [torch.randn(1, 37, H, D), torch.randn(1, 37, HKV, D), torch.randn(1, 37, HKV, 12),
              make_decay("token", 1, 37), torch.randn(3, H, D, 12)]
    leaves = [x.requires_grad_() for x in leaves]
    for mode in ("chunk", "recurrent"):
        o, s = linear_attention(*leaves[:3], decay=leaves[3], cu_seqlens=cu, initial_state=leaves[4],
                                output_state=True, chunk_size=CHUNK, mode=mode)
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        (o.sum() + s.sum()).backward()
        assert all(torch.isfinite(x.grad).all() for x in leaves)


@needs_triton
def test_compile_traces_the_op():
    def f(q, k, v, g):
        o, s = linear_attention(q, k, v, decay=g, output_state=True, chunk_size=CHUNK)
        return o.square().sum() + s.sum()

    inputs = [torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16), make_decay("head", 1, 20, 2)]
    eager = [x.clone().requires_grad_() for x in inputs]
    comp = [x.clone().requires_grad_() for x in inputs]
    f(*eager).backward()
    torch.compile(f, fullgraph=True, backend="aot_eager")(*comp).backward()
    for a, b in zip(eager, comp):
        assert rel(a.grad, b.grad) < 1e-6


def test_reference_backend_when_forced(monkeypatch):
    q, k, v, g = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 1, 8), torch.randn(1, 20, 1, 8), make_decay("token", 1, 20, 2)
    expected, _ = linear_attention_quadratic(q, k, v, decay=g)
    monkeypatch.setenv("TGOLF_BACKEND", "reference")
    assert rel(linear_attention(q, k, v, decay=g), expected) < 1e-6


@pytest.mark.parametrize("kwargs, name", [
    (dict(q=torch.randn(1, 8, 2, 4, 1)), "q, k, v"),
    (dict(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), "heads"),
    (dict(decay=torch.zeros(3)), "decay"),
    (dict(cu_seqlens=torch.tensor([0, 8])), "cu_seqlens"),
    (dict(initial_state=torch.zeros(1, 2, 16, 16)), "initial_state"),
    (dict(chunk_size=48), "chunk_size"),
    (dict(mode="parallel"), "mode"),
])
def test_bad_arguments(kwargs, name):
    args = dict(q=torch.randn(1, 8, 4, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=name):
        linear_attention(q, k, v, **args)


# ------------------------------------------------------------------------------------------------ modules

def _tiny_model(attention: str, **overrides):
    from tgolf.config import Config
    from tgolf.model import build_model

    cfg = Config(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=256, attention=attention,
                 attention_window=12)
    return build_model(cfg, **overrides)


@pytest.mark.parametrize("attention", ["linear", "hybrid"])
def test_modules_plug_into_the_gpt(attention):
    model = _tiny_model(attention)
    for p in model.parameters():  # the GPT zero-initialises its output projections; wake them for the test
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 256, (2, 41))
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    attn = model.blocks[0].attn
    assert attn.log_decay_rate.grad.abs().sum() > 0


@pytest.mark.parametrize("seq_len, past, window", [(23, 0, 6), (5, 3, 6), (17, 8, 8), (4, 0, 16)])
def test_sliding_window_attention_matches_dense_mask(seq_len, past, window):
    from tgolf.nn.linear_attention import sliding_window_attention

    q, k, v = torch.randn(2, 4, seq_len, 8), torch.randn(2, 2, past + seq_len, 8), torch.randn(2, 2, past + seq_len, 8)
    qpos, kpos = torch.arange(seq_len)[:, None] + past, torch.arange(past + seq_len)[None, :]
    band = (kpos <= qpos) & (kpos > qpos - window)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
    assert rel(sliding_window_attention(q, k, v, window), expected) < 1e-6


def test_sliding_window_attention_with_documents_matches_dense_mask():
    from tgolf.nn.linear_attention import sliding_window_attention

    past, seq_len, window = 5, 19, 6
    q, k, v = torch.randn(2, 4, seq_len, 8), torch.randn(2, 2, past + seq_len, 8), torch.randn(2, 2, past + seq_len, 8)
    documents = torch.tensor([[0] * 3 + [1] * 10 + [2] * 2 + [3] * 9, [0] * 24]).cumsum(0)  # row 1: one document
    documents[0] = torch.tensor([0] * 3 + [1] * 10 + [2] * 2 + [3] * 9)
    qpos, kpos = torch.arange(seq_len)[:, None] + past, torch.arange(past + seq_len)[None, :]
    band = (kpos <= qpos) & (kpos > qpos - window)
    same = documents[:, past:, None] == documents[:, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=(band & same)[:, None], enable_gqa=True)
    assert rel(sliding_window_attention(q, k, v, window, documents), expected) < 1e-6
    assert rel(sliding_window_attention(q, k, v, window), expected) > 1e-2  # the documents change the answer


def _document_starts(batch: int, seq_len: int) -> torch.Tensor:
    """Row 0 starts mid-document, then documents begin at 4, 5 (one token long) and 15; row 1 starts at 0."""
    starts = torch.zeros(batch, seq_len, dtype=torch.bool)
    starts[0, [4, 5, 15]] = True
    starts[1, 0] = True
    return starts


@pytest.mark.parametrize("hybrid, decay, feature_map", [
    (False, "none", "identity"), (False, "head", "elu1"), (False, "token", "identity"),
    (True, "head", "identity"), (True, "token", "elu1"), (True, "none", "relu")])
def test_document_starts_reset_the_state(hybrid, decay, feature_map):
    """A document's outputs do not depend on the tokens before its start (their inputs redrawn). With the identity
    map they equal the document run alone; a positive map applied after RoPE sees absolute positions, so there
    the document stays where it is."""
    from tgolf.nn.linear_attention import HybridAttention, LinearAttention

    torch.manual_seed(0)
    cls = HybridAttention if hybrid else LinearAttention
    attn = cls(32, num_heads=4, num_kv_heads=2, window=6, decay=decay, feature_map=feature_map, chunk_size=16)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    x, starts = torch.randn(2, 23, 32), _document_starts(2, 23)
    with torch.no_grad():
        out = attn(x, starts)
        for row in range(2):
            edges = [0, *(i for i in starts[row].nonzero().flatten().tolist() if i > 0), 23]
            for lo, hi in zip(edges[:-1], edges[1:]):
                redrawn = x.clone()
                redrawn[row, :lo] = torch.randn(lo, 32)
                assert rel(attn(redrawn, starts)[row, lo:hi], out[row, lo:hi]) < 1e-5, (row, lo, hi)
                if feature_map == "identity":
                    assert rel(attn(x[row:row + 1, lo:hi])[0], out[row, lo:hi]) < 1e-5, (row, lo, hi)
        assert rel(out, attn(x)) > 1e-2  # without the starts the rows are single streams


def test_streaming_with_document_starts_equals_one_long_pass():
    from tgolf.eval.stateful import streaming
    from tgolf.nn.linear_attention import HybridAttention

    attn = HybridAttention(32, num_heads=4, num_kv_heads=2, window=6, decay="head", chunk_size=16)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    x, starts = torch.randn(2, 25, 32), _document_starts(2, 25)
    with torch.no_grad():
        full = attn(x, starts)
        for window in (10, 4):  # the second is shorter than W: the cached starts span several calls
            with streaming(attn):
                streamed = torch.cat([attn(x[:, lo:lo + window], starts[:, lo:lo + window])
                                      for lo in range(0, x.shape[1], window)], 1)
            assert rel(streamed, full) < 1e-5, window


def _explicit_hybrid(attn, x: torch.Tensor) -> torch.Tensor:
    """Softmax over t−W < s ≤ t plus λ · normalised linear attention over s ≤ t − W, written out in float64."""
    q, k, v = (t.double() for t in attn.rotated_qkv(x))
    group = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [B, H, T, D]
    seq_len, W = x.shape[1], attn.window
    t_idx, s_idx = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    band = (s_idx <= t_idx) & (s_idx > t_idx - W)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~band, float("-inf"))
    y_swa = scores.softmax(-1) @ v
    g = attn.log_decay(x)
    g = torch.zeros(attn.num_heads) if g is None else g.double()
    g = g[None, None, :].expand(x.shape[0], seq_len, -1) if g.dim() == 1 else g
    cum = g.cumsum(1).transpose(1, 2)  # [B, H, T]
    old = s_idx <= t_idx - W
    weights = (cum[..., :, None] - cum[..., None, :]).masked_fill(~old, float("-inf")).exp()
    phi = attn.feature_map.double()
    lin = (phi(q) @ phi(k).transpose(-1, -2)) / math.sqrt(attn.feature_dim) * weights
    y_lin = lin @ v
    y_lin = y_lin / (lin.sum(-1, keepdim=True) + attn.eps) if phi.normalize else F.rms_norm(y_lin, (v.shape[-1],))
    y = y_swa + attn.linear_gain.double()[:, None, None] * y_lin
    return attn.proj.double()(y.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("decay, feature_map", [("head", "identity"), ("token", "elu1"), ("none", "hedgehog")])
def test_hybrid_counts_each_token_once(decay, feature_map):
    from tgolf.nn.linear_attention import HybridAttention

    attn = HybridAttention(32, num_heads=4, num_kv_heads=2, linear="bf16", window=6, decay=decay,
                           feature_map=feature_map, chunk_size=16)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    x = torch.randn(2, 23, 32)
    expected = _explicit_hybrid(attn, x)
    attn.float()
    assert rel(attn(x), expected) < 1e-5


@pytest.mark.parametrize("hybrid, decay, feature_map, rope_dims", [
    (False, "head", "identity", 0), (False, "token", "elu1", 4),
    (True, "token", "identity", 0), (True, "head", "relu", 4)])
def test_streaming_equals_one_long_pass(hybrid, decay, feature_map, rope_dims):
    # rope_dims = 4: partial RoPE (4 of 8 dims) must also rotate at absolute positions while streaming
    from tgolf.eval.stateful import streaming
    from tgolf.nn.linear_attention import HybridAttention, LinearAttention

    cls = HybridAttention if hybrid else LinearAttention
    attn = cls(32, num_heads=4, num_kv_heads=2, window=6, decay=decay, feature_map=feature_map, chunk_size=16,
               rope_dims=rope_dims)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    x = torch.randn(2, 25, 32)
    with torch.no_grad():
        full = attn(x)
        for window in (10, 4):  # the second is shorter than the hybrid's W
            with streaming(attn):
                streamed = torch.cat([attn(x[:, lo:lo + window]) for lo in range(0, x.shape[1], window)], 1)
            assert rel(streamed, full) < 1e-5, window


@pytest.mark.parametrize("attention, doc_attention", [("linear", False), ("linear", True), ("hybrid", True)])
def test_evaluate_stateful_matches_one_pass(attention, doc_attention):
    from tgolf.data.tokenizer import ByteTables
    from tgolf.eval.stateful import evaluate_stateful

    # doc_attention: the state carried across windows is reset at the BOS inside the third window
    model = _tiny_model(attention, doc_attention=doc_attention)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(2, 256, (58,))
    tokens[[0, 20]] = 1  # BOS opens documents at 0 and 20
    tables = ByteTables(torch.randint(1, 4, (256,), dtype=torch.int16), torch.rand(256) < 0.5,
                        torch.arange(256) < 2)
    result = evaluate_stateful(model, tokens, 16, tables, "cpu", buckets=(0, 8, 16, 32))
    with torch.no_grad():
        nll = model(tokens[None, :-1], tokens[None, 1:], reduction="none")
    assert result.overall.tokens == 57
    assert math.isclose(result.overall.val_loss, nll.mean().item(), rel_tol=1e-5)
    if doc_attention:  # the second document scored alone, in one pass
        with torch.no_grad():
            alone = model(tokens[None, 20:-1], tokens[None, 21:], reduction="none")
        torch.testing.assert_close(nll[:, 20:], alone, rtol=1e-4, atol=1e-5)
    # documents: targets 1..20 see contexts 1..20 (first doc), targets 21..57 contexts 1..37 (second doc)
    counts = {b["context_from"]: b["tokens"] for b in result.buckets}
    assert counts == {0: 7 + 7, 8: 8 + 8, 16: 5 + 16, 32: 6}
    two = evaluate_stateful(model, tokens, 16, tables, "cpu", num_streams=2)
    assert two.overall.tokens == 57


def test_benchmark_checks_long_cases_on_the_state_passes_they_time():
    """A long benchmark case is checked on smaller inputs (its reference would not fit); where the timed call walks
    segments those inputs do too, so a wrong segmented pass gets no speed figure, and the whole walk is timed beside
    it."""
    pytest.importorskip("triton")
    from tgolf.bench.linear_attention import cases
    from tgolf.kernels.linear_attention import segment_chunks

    def segmented(b: int, t: int, h: int, d: int) -> bool:
        return segment_chunks(b, h, d, d, b * t // 64) > 0

    for case in cases("contest"):
        b, t, h, d = (case.shape[key] for key in "BTHD")
        checked = (case.check_inputs or case.make_inputs)(torch.device("cpu"), 0)[0].shape  # q [B, T, H, D]
        assert segmented(*checked) == segmented(b, t, h, d), (case.label, tuple(checked))
        assert ("whole_walk" in case.anchors) == segmented(b, t, h, d), case.label  # what the segments save
    assert any(segmented(*(c.shape[key] for key in "BTHD")) for c in cases("contest"))


@needs_triton
def test_whole_walk_anchor_turns_segments_off_for_its_call_only(monkeypatch):
    from tgolf.bench.linear_attention import _whole_walk
    from tgolf.kernels import linear_attention as kern

    walks = []
    state_pass = kern._state_pass
    monkeypatch.setattr(kern, "_state_pass", lambda *args: walks.append(args[6] is None) or state_pass(*args))
    q, k, v = (torch.randn(1, 2048, 1, 16) for _ in range(3))  # 32 chunks, one program: segments by default
    g = make_decay("token", 1, 2048, 1)
    segmented = linear_attention(q, k, v, decay=g)
    whole = _whole_walk(1.0).load()(q, k, v, g)
    assert walks == [False, True] and not kern.WHOLE_WALK
    assert rel(whole, segmented) < 1e-5
