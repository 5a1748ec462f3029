"""QAT (int4–8) and FP8 linear: references vs every backend, outputs and gradients, exact codes, bad arguments."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgolf.ops import quant as ops
from tgolf.ops.quant import reference as ref
from tgolf.nn.quant import FP8Linear, QATLinear
from _inductor_code import compiled_run, gpu_layer_after_norm, norm_kernel_with, output_and_grads

BACKENDS = ["triton", "reference"]  # triton runs on the CPU interpreter (tests/conftest.py)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton" and ops.qat_choice(torch.device("cpu")).backend != "triton":
        pytest.skip("Triton interpreter not active")
    monkeypatch.setenv("TGOLF_BACKEND", request.param)
    return request.param


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty is filled with garbage (NaN for floats) so unwritten outputs cannot pass."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point and t.element_size() > 1:
            t.fill_(float("nan"))
        elif t.dtype == torch.int8:
            t.fill_(-77)
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t.view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn, +NaN in e5m2
        return t

    monkeypatch.setattr(torch, "empty", empty)


def awkward_weight(n: int, k: int) -> torch.Tensor:
    """Random weights with a zero row, an outlier row and exact quantization ties (k + 0.5) · scale."""
    w = torch.randn(n, k) * 0.05
    w[0] = 0.0
    w[1, :3] = torch.tensor([9.0, -7.0, 3.0])
    return w


def tie_rows(bits: int, k: int) -> torch.Tensor:
    """Rows whose absmax makes the scale exactly 1.0 (or 0.5), filled with half-integers: round-half-even ties."""
    qmax = ref.qmax_for_bits(bits)
    halves = (torch.arange(k) % (2 * qmax) - qmax + 0.5)
    rows = torch.stack([halves, -halves, 0.5 * halves])
    rows[:, 0] = torch.tensor([qmax, qmax, 0.5 * qmax])
    return rows


# ------------------------------------------------------------------------------------------------------------
# QAT
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [None, 16, 24, 100])
def test_qat_codes_and_scales_exact(backend, poisoned, bits, group_size):
    w = torch.cat([awkward_weight(37, 70), tie_rows(bits, 70)])
    for clip in ({}, {"clip_sigmas": 2.5}):
        codes, scales = ops.qat_quantize(w, bits, group_size, **clip)
        ref_codes, ref_scales = ref.quantize_weight(w, bits, group_size, **clip)
        assert codes.dtype == torch.int8 and scales.dtype == torch.float32
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
        assert torch.equal(scales, scales.half().float())  # fp16-exact
        assert codes.abs().max() <= ref.qmax_for_bits(bits)


def test_qat_codes_quantile_clip(backend):
    w = awkward_weight(9, 40)
    codes, scales = ops.qat_quantize(w, 6, 16, clip_quantile=0.9)
    ref_codes, ref_scales = ref.quantize_weight(w, 6, 16, clip_quantile=0.9)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 24])
def test_qat_fake_quantize_exact(backend, poisoned, dtype, group_size):
    w = torch.cat([awkward_weight(37, 70), tie_rows(6, 70)])
    out = ops.qat_fake_quantize(w, 6, group_size, None, None, dtype)
    expected = ref.dequantize_weight(*ref.quantize_weight(w, 6, group_size), group_size).to(dtype)
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("gemm", ops.QAT_GEMMS)
@pytest.mark.parametrize("shape", [(2, 37, 70, 50), (1, 5, 33, 65)])
@pytest.mark.parametrize("bits,group_size,bias", [(4, None, True), (6, 32, False), (8, 24, True), (6, None, False)])
def test_qat_linear_forward_and_grads(backend, poisoned, gemm, shape, bits, group_size, bias):
    b, t, k, n = shape
    x = torch.randn(b, t, k, requires_grad=True)
    w = (awkward_weight(n, k) + 0.01).requires_grad_()
    bb = torch.randn(n, requires_grad=True) if bias else None
    out = ops.qat_linear(x, w, bb, bits, group_size, gemm=gemm)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w] + ([bb] if bias else []), grad)
    expected_out = ref.qat_linear_reference(x, w, bb, bits, group_size)
    expected = torch.autograd.grad(expected_out, [x, w] + ([bb] if bias else []), grad)
    assert out.shape == (b, t, n) and out.dtype == x.dtype
    assert rel_err(out, expected_out) < 1e-5
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and rel_err(g, e) < 1e-5
    # STE: the weight gradient is exactly that of a plain linear (clipped entries included)
    assert torch.allclose(got[1], grad.reshape(-1, n).T @ x.reshape(-1, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemm", ops.QAT_GEMMS)
def test_qatlinear_export_codes_equal_training_codes(backend, gemm):
    torch.manual_seed(1)
    layer = QATLinear(70, 50, bias=True, bits=5, group_size=32, gemm=gemm)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(3, 11, 70)
    for _ in range(2):  # codes must follow the weight through an optimizer step
        codes, scales = layer.quantized_weight()
        ref_codes, ref_scales = ref.quantize_weight(layer.weight, 5, 32)
        train_codes, train_scales = ops.qat_quantize(layer.weight.detach(), 5, 32)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
        assert torch.equal(codes, train_codes) and torch.equal(scales, train_scales)
        out = layer(x)
        exported = F.linear(x, ref.dequantize_weight(codes, scales, 32), layer.bias)
        assert rel_err(out, exported) < 1e-5
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_qatlinear_dense_weight_is_made_once_per_update_and_dtype(backend, monkeypatch):
    """Micro-batches between optimizer steps reuse one dequantized weight; it follows the weight and the compute
    dtype, and the straight-through gradient still reaches the latent weight."""
    calls = []
    real = ops.qat_dense_weight
    monkeypatch.setattr("tgolf.nn.quant.qat_dense_weight", lambda *a: calls.append(a[-1]) or real(*a))
    layer = QATLinear(24, 10, bits=6, group_size=8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(5, 24)
    outs = [layer(x) for _ in range(3)]  # three micro-batches
    assert calls == [torch.float32] and all(torch.equal(o, outs[0]) for o in outs)
    sum(o.square().sum() for o in outs).backward()
    grad = layer.weight.grad.clone()
    expected = F.linear(x, ref.dequantize_weight(*ref.quantize_weight(layer.weight, 6, 8), 8))
    assert rel_err(outs[0], expected) < 1e-6
    assert torch.allclose(grad, sum(2 * o.detach() for o in outs).T @ x, rtol=1e-5, atol=1e-5)  # STE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert calls == [torch.float32, torch.bfloat16]
    opt.step()
    after = layer(x)
    assert len(calls) == 3 and not torch.equal(after, outs[0])
    layer.weight.data.mul_(-1)  # a write through .data: invalidate() is the escape hatch
    layer.invalidate()
    assert torch.allclose(layer(x), -after, atol=1e-6) and len(calls) == 4
    with pytest.raises(ValueError, match="dequantized: expected torch.float32"):
        ops.qat_linear(x, layer.weight, dequantized=torch.zeros(10, 24, dtype=torch.bfloat16))


def test_qatlinear_is_a_drop_in_linear():
    layer = QATLinear(20, 12, bias=True, bits=6)
    plain = torch.nn.Linear(20, 12, bias=True)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    layer.load_state_dict(plain.state_dict())
    assert layer.weight.dtype == torch.float32 and (layer.bits, layer.group_size) == (6, None)
    assert "bits=6" in repr(layer)


# ------------------------------------------------------------------------------------------------------------
# FP8
# ------------------------------------------------------------------------------------------------------------

def fp8_grid_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows with amax = the format's max (scale 1): every finite positive value, midpoints (ties), negatives,
    subnormal midpoints, zeros; then the same rows scaled by 2^-20 (a row scale, exact) and a zero row."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    grid = values[values.isfinite() & (values >= 0)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([grid, mids, -mids, -grid, torch.tensor([-0.0, 0.0])])
    rows = torch.stack([row, row.flip(0)])
    return torch.cat([rows, rows * 2.0 ** -20, torch.zeros(1, row.numel())])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_quantize_exact(backend, poisoned, fmt, scaling):
    for x in (fp8_grid_rows(ref.FP8_FORMATS[fmt]), torch.randn(37, 70) * torch.logspace(-6, 3, 37)[:, None]):
        q, s = ops.fp8_quantize(x, fmt, scaling)
        rq, rs = ref.quantize_fp8(x, fmt, scaling)
        assert q.dtype == ref.FP8_FORMATS[fmt] and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
        assert torch.equal(s, rs)
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_quantize_fusible_equals_the_reference_bit_for_bit(fmt, scaling):
    """The quantization torch.compile sees (integer operations on the fp32 bits) against the reference's frexp and
    ldexp: the grid, ties, subnormals, amax at and beside the format's max, amax below AMAX_RANGE, zero rows."""
    top = torch.finfo(ref.FP8_FORMATS[fmt]).max
    edges = torch.tensor([[top, 1.0], [top * (1 + 2 ** -23), 1.0], [top * (1 - 2 ** -24), -2.0],
                          [2.0 ** -70, -(2.0 ** -72)], [0.0, -0.0]])
    for x in (fp8_grid_rows(ref.FP8_FORMATS[fmt]), torch.randn(37, 70) * torch.logspace(-6, 3, 37)[:, None],
              edges):
        q, s = ops.fp8_quantize_fusible(x, fmt, scaling)
        rq, rs = ref.quantize_fp8(x, fmt, scaling)
        assert q.dtype == rq.dtype and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
        assert s.shape == rs.shape and torch.equal(s, rs)


def _norm_then_fp8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ops.fp8_linear(F.rms_norm(x, (x.shape[-1],)), w, None, "row")


def test_compiled_fp8_linear_quantizes_inside_the_kernel_that_produces_x():
    """Under torch.compile (inductor; its CPU backend here) the activation's fp8 quantization joins the RMSNorm
    kernel that produces the activation: one kernel computes the norm, its amax and its codes, the norm's output
    is never written out, and the opaque fp8_quantize op is gone. Outputs and gradients equal the eager op's."""
    x, w = torch.randn(2, 20, 48, requires_grad=True), torch.randn(36, 48, requires_grad=True)
    (out, grads), code, kernels = compiled_run(output_and_grads, _norm_then_fp8, x, w)
    want_out, want_grads = output_and_grads(_norm_then_fp8, x, w)
    assert torch.equal(out, want_out)
    for got, want in zip(grads, want_grads):
        assert rel_err(got, want) < 1e-5
    assert norm_kernel_with(kernels, "amax", "to_copy"), kernels
    assert "(40, 48), (48, 1), torch.float32" not in code  # no fp32 [M, K] buffer: the norm's output
    assert "fp8_quantize" not in code


def test_fp8_scale_reference_values():
    amax = torch.tensor([448.0, 448.0001, 224.0, 1.0, 0.0])
    scale = ref.fp8_scale(amax, torch.float8_e4m3fn)
    assert scale.tolist() == [1.0, 2.0, 0.5, 2.0 ** -8, 2.0 ** -68]


@pytest.mark.parametrize("scaling", ["tensor", "row"])
@pytest.mark.parametrize("fp8_backward", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_forward_and_grads(backend, poisoned, scaling, fp8_backward, bias):
    x = (torch.randn(2, 37, 70) * torch.linspace(0.1, 3, 70)).requires_grad_()
    w = torch.randn(50, 70, requires_grad=True)
    bb = torch.randn(50, requires_grad=True) if bias else None
    inputs = [x, w] + ([bb] if bias else [])
    out = ops.fp8_linear(x, w, bb, scaling, fp8_backward)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    expected_out = ref.fp8_linear_reference(x, w, bb, scaling, fp8_backward)
    expected = torch.autograd.grad(expected_out, inputs, grad)
    assert out.shape == (2, 37, 50) and rel_err(out, expected_out) < 1e-5
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-5
    # the forward really is fp8: far from the unquantized product
    assert rel_err(out, F.linear(x, w, bb)) > 1e-3


def test_fp8linear_module_matches_reference():
    layer = FP8Linear(40, 24, bias=True, scaling="row")
    x = torch.randn(3, 7, 40)
    assert rel_err(layer(x), ref.fp8_linear_reference(x, layer.weight, layer.bias, "row")) < 1e-5
    assert layer.state_dict().keys() == torch.nn.Linear(40, 24).state_dict().keys()


@pytest.mark.skipif(ops.qat_choice(torch.device("cpu")).backend != "triton", reason="Triton interpreter not active")
@pytest.mark.parametrize("group_size", [None, 40])
def test_gpu_tiles_on_the_interpreter(poisoned, group_size):
    """The GEMMs with the tiles a GPU launch uses (never run by the tests above, which use the interpreter's small
    tiles): two M and N tiles with ragged edges, several K steps, a scale group boundary inside a K tile."""
    from tgolf.kernels import quant as kq

    qat, fp8 = kq.gemm_blocks(fp8=False, interpret=False), kq.gemm_blocks(fp8=True, interpret=False)
    m, n = qat["BLOCK_M"] + 3, qat["BLOCK_N"] + 5
    k = 2 * max(qat["BLOCK_K"], fp8["BLOCK_K"]) + 7
    x, w, bias = torch.randn(m, k), awkward_weight(n, k), torch.randn(n)
    codes, scales = ref.quantize_weight(w, 6, group_size)
    dense = ref.dequantize_weight(codes, scales, group_size)
    g = group_size or k
    assert rel_err(kq.qat_matmul(x, codes, scales, g, bias=bias, config=qat), x @ dense.T + bias) < 1e-6
    grad = torch.randn(m, n)
    got = kq.qat_matmul(grad, codes, scales, g, weight_rows_are_n=False, config=qat)
    assert rel_err(got, grad @ dense) < 1e-6
    xq, sx = ref.quantize_fp8(x, "e4m3", "row")
    wq, sw = ref.quantize_fp8(w, "e4m3", "row")
    got = kq.fp8_matmul(xq, sx, wq.T, sw, torch.float32, bias=bias, config=fp8)
    expected = ref.dequantize_fp8(xq, sx) @ ref.dequantize_fp8(wq, sw).T + bias
    assert rel_err(got, expected) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# Errors, compile, modules inside the GPT
# ------------------------------------------------------------------------------------------------------------

def test_bad_arguments():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    for bits in (3, 9, 6.0, True):
        with pytest.raises(ValueError, match="bits"):
            ops.qat_linear(x, w, bits=bits)
        with pytest.raises(ValueError, match="bits"):
            QATLinear(16, 8, bits=bits)
    for group_size in (0, -4, 2.5):
        with pytest.raises(ValueError, match="group_size"):
            ops.qat_linear(x, w, group_size=group_size)
    with pytest.raises(ValueError, match="gemm"):
        ops.qat_linear(x, w, gemm="cutlass")
    with pytest.raises(ValueError, match=r"\(4, 12\).*\(8, 16\)"):
        ops.qat_linear(torch.randn(4, 12), w)
    with pytest.raises(ValueError, match=r"\(4, 12\).*\(8, 16\)"):
        ops.fp8_linear(torch.randn(4, 12), w)
    with pytest.raises(ValueError, match="bias"):
        ops.qat_linear(x, w, torch.randn(7))
    with pytest.raises(ValueError, match="clip_sigmas"):
        ops.qat_linear(x, w, clip_sigmas=-1.0)
    with pytest.raises(ValueError, match="at most one"):
        QATLinear(16, 8, clip_sigmas=2.0, clip_quantile=0.99)
    with pytest.raises(ValueError, match="scaling"):
        ops.fp8_linear(x, w, scaling="column")
    with pytest.raises(ValueError, match="scaling"):
        FP8Linear(16, 8, scaling="block")


@pytest.mark.parametrize("which", ["qat_fused", "qat_dense", "fp8"])
def test_torch_compile_fullgraph(backend, which):
    x = torch.randn(3, 5, 24, requires_grad=True)
    w = torch.randn(10, 24, requires_grad=True)
    fn = (lambda a, b: ops.fp8_linear(a, b, None, "row", True)) if which == "fp8" else \
        (lambda a, b: ops.qat_linear(a, b, None, 6, 8, gemm=which[4:]))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    got = torch.autograd.grad(out.square().sum(), [x, w])
    expected_out = fn(x, w)
    expected = torch.autograd.grad(expected_out.square().sum(), [x, w])
    assert torch.allclose(out, expected_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qat6", "fp8"])
def test_inside_gpt(kind):
    from tgolf.config import Config
    from tgolf.model import GPT
    from tgolf.nn import make_linear

    assert type(make_linear(kind, 8, 4)).__name__ == ("QATLinear" if kind == "qat6" else "FP8Linear")
    model = GPT(Config(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, linear=kind))
    ids = torch.randint(0, 64, (2, 16))
    loss = model(ids, ids.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    qat = [m for m in model.modules() if isinstance(m, (QATLinear, FP8Linear))]
    assert qat and all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in qat)


@pytest.mark.parametrize("kind", ["qat", "fp8"])
def test_modules_under_cpu_autocast(kind):
    if kind == "qat":
        layer = QATLinear(24, 10, bias=True, bits=6, group_size=8)
        reference = lambda a: ref.qat_linear_reference(a, layer.weight, layer.bias, 6, 8)  # noqa: E731
    else:
        layer = FP8Linear(24, 10, bias=True, scaling="tensor")
        reference = lambda a: ref.fp8_linear_reference(a, layer.weight, layer.bias, "tensor")  # noqa: E731
    x = torch.randn(2, 5, 24)  # fp32 input, as from rms_norm: autocast casts it to bf16, as for nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference(x.to(torch.bfloat16))) < 1e-2
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): Triton / _scaled_mm on the device vs the reference
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("group_size", [None, 64, 48])
def test_gpu_qat_codes_exact(bits, group_size):
    w = torch.cat([awkward_weight(300, 520), tie_rows(bits, 520)]).cuda()
    for clip in ({}, {"clip_sigmas": 3.0}):
        codes, scales = ops.qat_quantize(w, bits, group_size, **clip)
        ref_codes, ref_scales = ref.quantize_weight(w.cpu(), bits, group_size, **clip)
        assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ops.QAT_GEMMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("group_size", [None, 128, 48])
def test_gpu_qat_linear(gemm, dtype, tol, group_size):
    x = torch.randn(4, 300, 520, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(776, 520, device="cuda") * 0.05).requires_grad_()
    b = torch.randn(776, device="cuda", requires_grad=True)
    out = ops.qat_linear(x, w, b, 6, group_size, gemm=gemm)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w, b], grad)
    xr = x.detach().double().requires_grad_()
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    expected_out = ref.qat_linear_reference(xr, wr, br, 6, group_size)
    expected = torch.autograd.grad(expected_out, [xr, wr, br], grad.double())
    assert rel_err(out, expected_out) < tol
    for g, e in zip(got, expected):
        assert rel_err(g, e) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_gpu_fp8_quantize_exact(fmt, scaling):
    for x in (fp8_grid_rows(ref.FP8_FORMATS[fmt]), torch.randn(300, 520) * torch.logspace(-6, 3, 300)[:, None]):
        q, s = ops.fp8_quantize(x.cuda(), fmt, scaling)
        rq, rs = ref.quantize_fp8(x, fmt, scaling)
        assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_gpu_compiled_fp8_quantize_fusible_exact(fmt, scaling):
    """What inductor generates for the GPU from fp8_quantize_fusible (its own fp8 cast) equals the reference."""
    compiled = torch.compile(ops.fp8_quantize_fusible, fullgraph=True)
    for x in (fp8_grid_rows(ref.FP8_FORMATS[fmt]), torch.randn(300, 520) * torch.logspace(-6, 3, 300)[:, None]):
        q, s = compiled(x.cuda(), fmt, scaling)
        rq, rs = ref.quantize_fp8(x, fmt, scaling)
        assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)


@pytest.mark.gpu
def test_gpu_compiled_fp8_linear_quantizes_inside_the_norm_kernel():
    """On the GPU too, inductor puts the activation's quantization into the RMSNorm's Triton kernel."""
    if not ops.fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores")
    out, want, code, kernels = gpu_layer_after_norm(_norm_then_fp8)
    # inductor quantizes the norm's fp32 output, eager its bf16 rounding: ~4% of the codes one fp8 step apart
    # (1.6% relative error on the CPU's inductor at this shape; 0.17% against a reference on the fp32 norm)
    assert rel_err(out, want) < 3e-2
    assert norm_kernel_with(kernels, "amax"), kernels
    assert "fp8_quantize" not in code


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["tensor", "row"])
@pytest.mark.parametrize("fp8_backward", [False, True])
@pytest.mark.parametrize("k,n", [(512, 1536), (520, 776)])  # _scaled_mm shapes, and the Triton fp8 GEMM
def test_gpu_fp8_linear(scaling, fp8_backward, k, n):
    if not ops.fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores")
    x = torch.randn(4, 256, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", requires_grad=True)
    out = ops.fp8_linear(x, w, None, scaling, fp8_backward)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w], grad)
    expected_out = ref.fp8_linear_reference(x, w, None, scaling, fp8_backward)
    expected = torch.autograd.grad(expected_out, [x, w], grad)
    assert rel_err(out, expected_out) < 1e-2
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qat6", "fp8"])
def test_gpu_gpt_under_autocast(kind):
    from tgolf.config import Config
    from tgolf.model import GPT

    model = GPT(Config(vocab_size=256, num_layers=2, model_dim=128, num_heads=2, num_kv_heads=1,
                            linear=kind)).cuda()
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, ids.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_inactive_qat_linear_is_a_plain_linear_and_compiled_graphs_follow_the_switch():
    """Late QAT: an inactive QATLinear is F.linear; torch.compile (fullgraph) guards on the switch, so the compiled
    model follows it both ways instead of keeping the graph it traced first."""
    from tgolf.nn.quant import set_qat_active

    torch.manual_seed(0)
    model = torch.nn.Sequential(QATLinear(24, 16, bits=5), torch.nn.ReLU(), QATLinear(16, 8, bias=True, bits=5))
    x = torch.randn(6, 24)
    quantized = model(x)
    assert set_qat_active(model, False) == 2 and "active=False" in repr(model[0])
    plain = F.linear(F.relu(F.linear(x, model[0].weight)), model[2].weight, model[2].bias)
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    assert rel_err(plain, quantized) > 1e-3  # 5-bit weights: the two forwards differ
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    for active, expected in ((False, plain), (True, quantized), (False, plain), (True, quantized)):
        set_qat_active(model, active)
        torch.testing.assert_close(compiled(x), expected)
    assert len(graphs) == 2  # one graph per value, each compiled once: after both exist, switching is free
