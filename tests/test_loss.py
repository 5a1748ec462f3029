"""Fused softcapped cross-entropy against the reference: losses and gradients of hidden and weight."""
from __future__ import annotations

import pytest
import torch

from tgolf.backend import choose
from tgolf.nn import get_loss
from tgolf.ops.loss import chunk_rows_for, softcap_cross_entropy
from tgolf.ops.loss.reference import softcap_ce_chunk_reference, softcap_cross_entropy_reference

needs_triton = pytest.mark.skipif(choose(torch.device("cpu")).backend != "triton",
                                  reason="Triton interpreter not active")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(n: int, d: int, v: int, scale: float = 1.0, dtype=torch.float32):
    hidden = torch.randn(n, d).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) * scale / d ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[0], targets[-1] = 0, v - 1  # the vocabulary's ends
    return hidden, weight, targets


def _check_against_reference(hidden, weight, targets, softcap, reduction, tol, chunk_rows=None):
    got = softcap_cross_entropy(hidden, weight, targets, softcap, reduction, chunk_rows=chunk_rows)
    want = softcap_cross_entropy_reference(hidden.float(), weight.float(), targets, softcap, reduction)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel(got, want) < tol
    # a non-uniform incoming gradient for per-row losses, a non-unit scalar for the mean
    grad = torch.rand_like(want) + 0.5 if reduction == "none" else torch.tensor(1.7)
    got_grads = torch.autograd.grad(got, (hidden, weight), grad)
    want_grads = torch.autograd.grad(want, (hidden, weight), grad)
    for g, w, name in zip(got_grads, want_grads, ("hidden", "weight")):
        assert g.dtype == hidden.dtype, name
        assert rel(g, w) < tol, name


# softcap 30 (baseline), 2 with large logits (tanh saturates: many logits at ±cap), 0 (no cap)
@pytest.mark.parametrize("softcap,scale", [(30.0, 1.0), (2.0, 40.0), (0.0, 1.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference_fp32(softcap, scale, reduction):
    hidden, weight, targets = _inputs(45, 24, 100, scale)
    # 16 rows per chunk: 3 chunks, the last one ragged
    _check_against_reference(hidden, weight, targets, softcap, reduction, 1e-5, chunk_rows=16)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference_bf16(reduction):
    hidden, weight, targets = _inputs(40, 32, 77, 4.0, dtype=torch.bfloat16)
    _check_against_reference(hidden, weight, targets, 30.0, reduction, 1e-2, chunk_rows=13)


def test_single_default_chunk_and_no_grad_paths():
    hidden, weight, targets = _inputs(30, 16, 50)
    _check_against_reference(hidden, weight, targets, 30.0, "mean", 1e-5)
    with torch.no_grad():
        for reduction in ("mean", "none"):
            got = softcap_cross_entropy(hidden, weight, targets, 30.0, reduction)
            assert rel(got, softcap_cross_entropy_reference(hidden, weight, targets, 30.0, reduction)) < 1e-5


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("TGOLF_BACKEND", "reference")
    hidden, weight, targets = _inputs(33, 16, 70, 10.0)
    _check_against_reference(hidden, weight, targets, 5.0, "none", 1e-5, chunk_rows=8)


def _chunk_case(dtype, n=9, v=100):
    logits = (torch.randn(n, v) * 20).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[0], targets[1] = 0, v - 1
    return logits, targets


@needs_triton
@pytest.mark.parametrize("max_block", [8192, 32])  # the row in one block, or swept in 4 blocks (last ragged)
@pytest.mark.parametrize("dtype,softcap", [(torch.float32, 15.0), (torch.float32, 0.0), (torch.bfloat16, 15.0)])
def test_chunk_kernel_matches_chunk_reference(monkeypatch, max_block, dtype, softcap):
    import tgolf.kernels.loss as kernels

    monkeypatch.setattr(kernels, "_MAX_BLOCK_V", max_block)
    logits, targets = _chunk_case(dtype)
    want_grad = logits.clone()
    want = softcap_ce_chunk_reference(want_grad, targets, softcap, 0.25)
    loss = torch.full((logits.shape[0],), float("nan"))
    kernels.softcap_ce_chunk(logits, targets, softcap, 0.25, loss=loss)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(loss, want) < 1e-5
    assert rel(logits, want_grad) < tol  # every element overwritten by its gradient
    # the chunk reference agrees with autograd of the reference loss
    z = _chunk_case(torch.float32)[0].requires_grad_()
    loss_ref = torch.nn.functional.cross_entropy(softcap * torch.tanh(z / softcap) if softcap else z, targets,
                                                 reduction="sum")
    (grad,) = torch.autograd.grad(loss_ref * 0.25, z)
    buf = z.detach().clone()
    softcap_ce_chunk_reference(buf, targets, softcap, 0.25)
    assert rel(buf, grad) < 1e-5


@needs_triton
def test_chunk_kernel_out_of_range_target_gives_nan():
    from tgolf.kernels.loss import softcap_ce_chunk

    logits, targets = _chunk_case(torch.float32, n=3)
    targets[1] = logits.shape[1]
    loss = softcap_ce_chunk(logits, targets, 30.0, 1.0)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    hidden, weight, targets = _inputs(20, 16, 40)
    fn = torch.compile(softcap_cross_entropy, fullgraph=True, backend="aot_eager")
    got = fn(hidden, weight, targets, 30.0, reduction)
    want = softcap_cross_entropy_reference(hidden, weight, targets, 30.0, reduction)
    assert rel(got, want) < 1e-5
    got_grads = torch.autograd.grad(got.sum(), (hidden, weight))
    want_grads = torch.autograd.grad(want.sum(), (hidden, weight))
    for g, w in zip(got_grads, want_grads):
        assert rel(g, w) < 1e-5


def test_registry_and_chunk_rule():
    assert get_loss("fused") is softcap_cross_entropy
    assert chunk_rows_for(65536, 8192) == 4096 and chunk_rows_for(65536, 1024) == 16384
    assert chunk_rows_for(10, 50000) == 10 and chunk_rows_for(1, 3) == 1


def test_bad_arguments():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 9])
    with pytest.raises(ValueError, match=r"hidden \(4, 7\).*weight \(10, 8\)"):
        softcap_cross_entropy(torch.randn(4, 7), weight, targets)
    with pytest.raises(ValueError, match="targets"):
        softcap_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match=r"\[0, 10\).*from 0 to 10"):
        softcap_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(TypeError, match="integer"):
        softcap_cross_entropy(hidden, weight, targets.float())
    with pytest.raises(TypeError, match="dtype"):
        softcap_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(hidden, weight, targets, reduction="sum")
    with pytest.raises(ValueError, match="softcap"):
        softcap_cross_entropy(hidden, weight, targets, softcap=float("nan"))
    with pytest.raises(ValueError, match="chunk_rows"):
        softcap_cross_entropy(hidden, weight, targets, chunk_rows=0)


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["default", "triton"])  # default: the CUDA chunk kernel when built
@pytest.mark.parametrize("vocab", [1024, 8192])
def test_gpu_bf16_and_memory(monkeypatch, backend, vocab):
    if backend != "default":
        monkeypatch.setenv("TGOLF_BACKEND", backend)
    n, d = 16384, 512
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, d, device="cuda") * 0.2).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[0], targets[-1] = 0, vocab - 1

    def run(fn):
        loss = fn(hidden, weight, targets, 30.0, "mean")
        loss.backward()
        return loss.detach()

    got = run(softcap_cross_entropy)
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    want = run(softcap_cross_entropy_reference)
    assert rel(got, want) < 1e-3
    assert rel(grads[0], hidden.grad) < 1e-2 and rel(grads[1], weight.grad) < 1e-2
    hidden.grad = weight.grad = None
    fused_peak = _peak_bytes(lambda: run(softcap_cross_entropy))
    hidden.grad = weight.grad = None
    ref_peak = _peak_bytes(lambda: run(softcap_cross_entropy_reference))
    # both peaks include the gradients' own storage; the logits dominate the reference's
    assert fused_peak <= ref_peak / 2, (fused_peak, ref_peak)


def test_cuda_chunk_kernel_only_for_the_vocabularies_it_was_measured_faster_at(monkeypatch):
    """On an H100 the CUDA chunk kernel beat the Triton one at V = 1024 and lost at V = 8192: larger vocabularies
    take Triton unless TGOLF_BACKEND=cuda asks for the CUDA kernel; tgolf.info says so."""
    import tgolf.ops.loss as L
    from tgolf import backend

    looked_up = []

    def choose(device, cuda_name=None, has_triton=True):  # the extension built and a GPU present
        looked_up.append(cuda_name)
        if cuda_name and backend.forced_backend() in (None, "cuda"):
            return backend.Choice("cuda", f"CUDA kernel torch.ops.tgolf.{cuda_name}")
        return backend.Choice("triton", "Triton kernel on the GPU")

    monkeypatch.setattr(L, "choose", choose)
    monkeypatch.delenv("TGOLF_BACKEND", raising=False)
    device = torch.device("cuda")
    assert [L._chunk_choice(device, v).backend for v in (1024, L.CUDA_MAX_VOCAB, 8192)] == ["cuda", "cuda", "triton"]
    looked_up.clear()
    assert "0.87×" in L._chunk_choice(device, 8192).reason
    assert looked_up == [None]  # the CUDA op is not looked up (its extension not loaded) where it will not run
    described = L._describe(device)
    assert described.backend == "cuda" and f"V ≤ {L.CUDA_MAX_VOCAB}" in described.reason and "triton" in described.reason
    monkeypatch.setenv("TGOLF_BACKEND", "cuda")
    assert L._chunk_choice(device, 8192).backend == "cuda"


def test_benchmark_times_l2_sized_chunks_beside_the_default():
    """The contest cases carry the op with 8 and 16 MB logits chunks (the A/B of chunk_rows_for's guess), each
    bound to its row count and computing what the op computes."""
    from tgolf.bench.loss import cases

    by_label = {case.label: case for case in cases("contest")}
    rows = {label: {name: impl.load().keywords["chunk_rows"] for name, impl in case.anchors.items()
                    if name.startswith("chunk_")} for label, case in by_label.items()}
    assert rows["N65536 D512 V8192"] == {"chunk_8mb": 512, "chunk_16mb": 1024}
    assert rows["N65536 D512 V1024"] == {"chunk_8mb": 4096, "chunk_16mb": 8192}
    assert not any(name.startswith("chunk_") for name in cases("quick")[0].anchors)  # one chunk: nothing to compare

    gen = torch.Generator().manual_seed(5)
    h, w = torch.randn(300, 24, generator=gen), torch.randn(50, 24, generator=gen)
    t = torch.randint(0, 50, (300,), generator=gen)
    anchor = by_label["N65536 D512 V8192"].anchors["chunk_8mb"].load()
    torch.testing.assert_close(anchor(h, w, t), softcap_cross_entropy(h, w, t, softcap=30.0))
