"""Ternary weights: quantizers, Triton kernels (TRITON_INTERPRET on CPU), ops, TernaryLinear, convert, packing."""
from __future__ import annotations

import fnmatch

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tgolf
from tgolf import backend
from tgolf.nn.ternary import TernaryLinear
from tgolf.ops import ternary as T
from tgolf.ops.ternary import reference as R
from _inductor_code import compiled_run, gpu_layer_after_norm, norm_kernel_with, output_and_grads

HAS_TRITON = backend.choose(torch.device("cpu")).backend == "triton"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need TRITON_INTERPRET=1 on the CPU")
GROUPS = [None, 16, 10]  # per row, a group size the int8 GEMM tiles, a ragged one it does not


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def weight(n: int = 45, k: int = 70, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(n, k) * 0.05
    w[3] = 0.0  # an all-zero row: scale clamps to fp16's smallest value, codes all 0
    w[4, :5] = 1e3  # outliers inflate one row's mean
    w[5] = 1.0  # every group's mean is exactly 1: ±0.5 are ties (→ 0), ±1.5 saturate (→ ±1)
    w[5, :4] = torch.tensor([0.5, 1.5, -0.5, -1.5])
    return w.to(dtype)


def kernels():
    from tgolf.kernels import ternary as kn

    return kn


# ------------------------------------------------------------------------------------------------------- quantizers

@pytest.mark.parametrize("group_size, dtype", [(None, torch.float32), (16, torch.float32), (10, torch.bfloat16),
                                               (128, torch.float32)])
def test_quantize_matches_reference(group_size, dtype):
    w = weight(dtype=dtype)
    codes, scales, packed = T.ternary_quantize(w, group_size)
    ref_codes, ref_scales = R.quantize_ternary(w, group_size)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and packed.dtype == torch.uint8
    assert torch.equal(scales, ref_scales) and torch.equal(codes, ref_codes)
    assert torch.equal(packed, T.pack2(ref_codes))
    assert torch.equal(scales.half().float(), scales)  # artifacts store fp16 scales losslessly
    assert codes[5, :4].tolist() == [0, 1, 0, -1] and bool((scales[3] == 2.0 ** -24).all())


def test_reference_is_bitnet_absmean():
    w = torch.randn(20, 64)
    codes, scales = R.quantize_ternary(w, 16)
    mean = w.abs().reshape(20, 4, 16).mean(-1)
    assert torch.allclose(scales, mean, rtol=1e-3)  # fp16 rounding only
    expected = torch.round(w / scales.repeat_interleave(16, 1)).clamp(-1, 1)
    assert torch.equal(codes.float(), expected)  # no exact ties on random data
    assert torch.equal(R.dequantize_ternary(codes, scales, 16), codes.float() * scales.repeat_interleave(16, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quant_matches_reference(dtype):
    x = (torch.randn(37, 70) * 3).to(dtype)
    x[5] = 0.0
    x[6, 7] = 0.5 * x[6].abs().max()  # lands on a rounding tie: half to even
    codes, scales = T.quantize_activations_int8(x)
    assert codes.abs().max() == 127 and torch.equal(codes[5], torch.zeros_like(codes[5]))
    if HAS_TRITON:
        got_codes, got_scales = torch.ops.tgolf.ternary_act_quant(x)
        assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales)
    assert rel(codes.float() * scales[:, None], x) < 1e-2


# ---------------------------------------------------------------------------------------------- forward / backward

def _autocast(fn, device_type: str = "cpu"):
    def run(*args):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(*args)
    return run


def _run(fn, x, w, b, grad):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(grad)
    return y, x.grad, w.grad, b.grad


# (act_bits, gemm): every training path
PATHS = [(None, "dense"), (None, "codes"), (8, "codes")]


@needs_triton
@pytest.mark.parametrize("act_bits, gemm", PATHS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_forward_and_gradients_fp32(group_size, act_bits, gemm):
    x, w, b = torch.randn(2, 67, 70), torch.randn(75, 70), torch.randn(75)  # several blocks along M, N and K
    grad = torch.randn(2, 67, 75)
    got = _run(lambda x, w, b: T.ternary_linear(x, w, b, group_size, act_bits, gemm), x, w, b, grad)
    ref = _run(lambda x, w, b: R.ternary_linear_reference(x, w, b, group_size, act_bits), x, w, b, grad)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert rel(g, r) < 1e-5


@needs_triton
@pytest.mark.parametrize("act_bits, gemm", PATHS)
def test_autocast_bf16(act_bits, gemm):
    x, w, b = torch.randn(37, 70), torch.randn(45, 70), torch.randn(45)
    grad = torch.randn(37, 45)
    got = _run(_autocast(lambda x, w, b: T.ternary_linear(x, w, b, 16, act_bits, gemm)), x, w, b, grad)
    ref = _run(_autocast(lambda x, w, b: R.ternary_linear_reference(x, w, b, 16, act_bits)), x, w, b, grad)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-2


@needs_triton
@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_gemm_exact(group_size):
    kn = kernels()
    xq = torch.randint(-127, 128, (37, 96), dtype=torch.int8)
    codes = torch.randint(-1, 2, (45, 96), dtype=torch.int8)
    groups = R.group_count(96, group_size)
    # unit scales: the output is the int32 accumulator itself (|acc| < 2^24, exact in fp32)
    ones = torch.ones(37), torch.ones(45, groups)
    out = torch.full((37, 45), float("nan"))
    kn.int8_mm(xq, ones[0], codes, ones[1], group_size or 96, torch.float32, out=out, interpret=True)
    assert torch.equal(out, (xq.int() @ codes.int().T).float())
    # real scales, per row: same fp32 operation order as the reference → bit-exact
    xs, ws, bias = torch.rand(37) + 0.1, torch.rand(45, 1) + 0.1, torch.randn(45)
    got = kn.int8_mm(xq, xs, codes, ws, 96, torch.float32, bias=bias, interpret=True)
    assert torch.equal(got, T._int8_mm_reference(xq, xs, codes, ws, bias, 0, torch.float32))


@needs_triton
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_outputs_are_fully_written(mode):
    kn = kernels()
    codes, scales = R.quantize_ternary(torch.randn(45, 70), 10)
    a = torch.randn(37, 45 if mode == kn.MODE_GRAD_INPUT else 70)
    w = T.pack2(codes) if mode == kn.MODE_PACKED else codes
    out = torch.full((37, 70 if mode == kn.MODE_GRAD_INPUT else 45), float("nan"))
    kn.ternary_mm(a, w, scales, 10, mode, 70, out=out, interpret=True)
    dense = R.dequantize_ternary(codes, scales, 10)
    assert rel(out, a @ dense if mode == kn.MODE_GRAD_INPUT else a @ dense.T) < 1e-5
    poisoned = torch.full((45, 70), 99, dtype=torch.int8), torch.full((45, 7), float("nan")), \
        torch.full((45, 18), 255, dtype=torch.uint8)
    w = torch.randn(45, 70)
    kn.quantize_weight(w, 10, *poisoned)
    assert torch.equal(poisoned[0], R.quantize_ternary(w, 10)[0]) and not poisoned[1].isnan().any()
    assert torch.equal(poisoned[2], T.pack2(poisoned[0]))
    x = torch.randn(37, 70)
    q, s = torch.full((37, 70), 99, dtype=torch.int8), torch.full((37,), float("nan"))
    kn.quantize_activations(x, q, s)
    ref_q, ref_s = R.quantize_activations_int8(x)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)


@needs_triton
@pytest.mark.parametrize("m", [5, 130])
def test_gpu_block_configs_on_the_interpreter(m):
    """The GPU block sizes (small-M and large tiles) under the interpreter: masking and tiling, fp32 upcast."""
    kn = kernels()
    codes, scales = R.quantize_ternary(torch.randn(45, 300), 32)
    dense = R.dequantize_ternary(codes, scales, 32)
    x, g = torch.randn(m, 300), torch.randn(m, 45)

    def mm(a, w, mode):
        return kn.ternary_mm(a, w, scales, 32, mode, 300, interpret=True, config=kn.mm_config(m, interpret=False))

    assert rel(mm(x, codes, kn.MODE_FORWARD), x @ dense.T) < 1e-5
    assert rel(mm(g, codes, kn.MODE_GRAD_INPUT), g @ dense) < 1e-5
    assert rel(mm(x, T.pack2(codes), kn.MODE_PACKED), x @ dense.T) < 1e-5
    xq, xs = R.quantize_activations_int8(x)
    got = kn.int8_mm(xq, xs, codes, scales, 32, torch.float32, interpret=True, config=kn.int8_config(m, False))
    assert rel(got, (xq.float() * xs[:, None]) @ dense.T) < 1e-5


# ------------------------------------------------------------------------------------------------- packed formats

@pytest.mark.parametrize("k", list(range(41)) + [1000, 4099])
def test_pack2_roundtrip(k):
    codes = torch.randint(-1, 2, (3, k), dtype=torch.int8)
    packed = T.pack2(codes)
    assert packed.shape == (3, (k + 3) // 4) and packed.dtype == torch.uint8
    assert torch.equal(T.unpack2(packed, k), codes)
    for j in range(min(k, 9)):  # the agreed layout: code j at bits 2*(j % 4) of byte j // 4, stored as c + 1
        assert ((packed[:, j // 4].int() >> (2 * (j % 4))) & 3).sub(1).equal(codes[:, j].int())


def test_pack2_errors():
    packed = T.pack2(torch.randint(-1, 2, (2, 10), dtype=torch.int8))
    with pytest.raises(ValueError, match="truncated"):
        T.unpack2(packed[:, :2], 10)
    with pytest.raises(ValueError, match="over-long"):
        T.unpack2(torch.cat([packed, packed[:, :1]], 1), 10)
    with pytest.raises(ValueError, match="padding"):
        T.unpack2(packed, 9)  # the 10th code (not padding) may be non-zero: 3 bytes either way
    bad = packed.clone()
    bad[0, 0] = 0b11
    with pytest.raises(ValueError, match="value 3"):
        T.unpack2(bad, 10)
    with pytest.raises(ValueError, match="codes must be in"):
        T.pack2(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="uint8"):
        T.unpack2(packed.int(), 10)


@pytest.mark.parametrize("k", list(range(41)) + [1000, 4099])
def test_base3_roundtrip(k):
    packing = pytest.importorskip("tgolf.export.packing")
    codes = torch.randint(-1, 2, (k,), dtype=torch.int8)
    data = packing.pack_base3(codes)
    assert data.numel() == (k + 4) // 5
    assert torch.equal(packing.unpack_base3(data, k), codes)
    with pytest.raises(ValueError, match="truncated"):
        packing.unpack_base3(data[:-1], k) if k else packing.unpack_base3(data, k + 6)
    with pytest.raises(ValueError, match="over-long"):
        packing.unpack_base3(torch.cat([data, data[:1] if k else torch.zeros(1, dtype=torch.uint8)]), k)


@needs_triton
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_packed_matmul(m, group_size):
    codes, scales, packed = T.ternary_quantize(torch.randn(45, 70), group_size)
    x = torch.randn(m, 70)
    got = T.packed_matmul(x, packed, scales, 70, group_size)
    assert rel(got, x @ R.dequantize_ternary(codes, scales, group_size).T) < 1e-5
    with pytest.raises(ValueError, match="truncated"):
        T.packed_matmul(x, packed[:, :-1], scales, 70, group_size)


class _OpLog(TorchDispatchMode):
    """Names of the ops that reach the dispatcher inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs_the_op", ["no", "grad", "compile"])
def test_inference_functions_skip_the_library_op_only_where_nothing_needs_it(needs_the_op):
    """packed_matmul and int8_linear (decoding: host time is the cost) run their op's implementation directly in
    plain eager calls; an input that requires grad, or tracing, goes through the torch.library op."""
    codes, scales, packed = T.ternary_quantize(torch.randn(45, 70))
    x = torch.randn(3, 70, requires_grad=needs_the_op == "grad")
    calls = (lambda x: T.packed_matmul(x, packed, scales, 70), lambda x: T.int8_linear(x, codes, scales))
    ops = ("tgolf::ternary_packed_mm", "tgolf::ternary_int8_linear")
    for call, op in zip(calls, ops):
        if needs_the_op == "compile":
            graphs = []
            torch.compile(call, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm)(x)
            assert any(str(n.target).startswith(op.replace("::", ".")) for n in graphs[0].graph.nodes)
            continue
        with _OpLog() as log:
            y = call(x)
        assert (op in log.names) == (needs_the_op == "grad"), log.names
        assert not y.requires_grad or needs_the_op == "grad"


# -------------------------------------------------------------------------------------------------------- errors

def test_bad_arguments():
    x, w = torch.randn(4, 70), torch.randn(45, 70)
    with pytest.raises(ValueError, match="group_size"):
        T.ternary_linear(x, w, group_size=0)
    with pytest.raises(ValueError, match="act_bits"):
        T.ternary_linear(x, w, act_bits=4)
    with pytest.raises(ValueError, match="in_features=70"):
        T.ternary_linear(torch.randn(4, 69), w)
    with pytest.raises(ValueError, match="2-D"):
        T.ternary_linear(x, w[0])
    codes, scales, _ = T.ternary_quantize(w)
    with pytest.raises(ValueError, match="codes"):
        T.ternary_linear_quantized(x, w, codes.int(), scales)
    with pytest.raises(ValueError, match="scales"):
        T.ternary_linear_quantized(x, w, codes, scales, group_size=16)
    with pytest.raises(ValueError, match="group_size"):
        TernaryLinear(70, 45, group_size=-1)


# ---------------------------------------------------------------------------------------------- the module, compile

@needs_triton
def test_compile_traces_ternary_linear():
    x, w, b = torch.randn(2, 5, 40), torch.randn(24, 40), torch.randn(24)
    grad = torch.randn(2, 5, 24)
    fn = torch.compile(lambda x, w, b: T.ternary_linear(x, w, b, 16, 8), fullgraph=True, backend="aot_eager")
    got = _run(fn, x, w, b, grad)
    ref = _run(lambda x, w, b: T.ternary_linear(x, w, b, 16, 8), x, w, b, grad)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    for gemm in T.TERNARY_GEMMS:
        module = TernaryLinear(40, 24, group_size=16, gemm=gemm)
        y = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(y, module(x))


def _norm_then_int8_layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return T.ternary_linear(F.rms_norm(x, (x.shape[-1],)), w, None, None, 8, "codes")


def test_compiled_act_bits_8_quantizes_inside_the_kernel_that_produces_x():
    """act_bits=8 under torch.compile (inductor; its CPU backend here): the per-token int8 quantization joins the
    RMSNorm kernel producing the activation (norm, amax and codes in one kernel, the norm's output never written,
    the opaque act-quant op gone), with the eager call's outputs and gradients."""
    x, w = torch.randn(2, 20, 48, requires_grad=True), torch.randn(36, 48, requires_grad=True)
    (out, grads), code, kernels = compiled_run(output_and_grads, _norm_then_int8_layer, x, w)
    want_out, want_grads = output_and_grads(_norm_then_int8_layer, x, w)
    assert rel(out, want_out) < 1e-5
    for got, want in zip(grads, want_grads):
        assert rel(got, want) < 1e-5
    assert norm_kernel_with(kernels, "amax", "round"), kernels
    assert "(40, 48), (48, 1), torch.float32" not in code  # no fp32 [M, K] buffer: the norm's output
    assert "ternary_act_quant" not in code


def test_module_is_a_drop_in_linear():
    module = tgolf.nn.make_linear("ternary", 70, 45, bias=True)
    assert isinstance(module, TernaryLinear) and isinstance(module, nn.Linear)
    assert module.weight.dtype == torch.float32 and module.group_size is None
    assert set(module.state_dict()) == set(nn.Linear(70, 45).state_dict())
    codes, scales = module.ternary_weight()
    assert codes.shape == (45, 70) and scales.shape == (45, 1) and set(codes.unique().tolist()) <= {-1, 0, 1}
    x = torch.randn(2, 3, 70)
    assert rel(module(x), R.ternary_linear_reference(x, module.weight, module.bias)) < 1e-5


@pytest.mark.parametrize("act_bits", [None, 8])
def test_inference_paths_match_training_forward(act_bits):
    module = TernaryLinear(70, 45, bias=True, group_size=16, act_bits=act_bits)
    for m in (3, 70):  # packed small-M path and the regular one
        x = torch.randn(m, 70)
        with torch.no_grad():
            fast = module(x)
        assert rel(fast, module(x)) < 1e-5


def test_cache_refreshes_after_optimizer_step():
    module = TernaryLinear(32, 16)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    first = module.quantized()
    module(torch.randn(4, 32)).square().sum().backward()
    assert all(a is b for a, b in zip(module.quantized(), first))  # same step: cached, not recomputed
    opt.step()
    codes, scales = module.ternary_weight()
    assert codes is not first[0]
    assert torch.equal(codes, R.quantize_ternary(module.weight, None)[0])
    assert torch.equal(scales, R.quantize_ternary(module.weight, None)[1]) and not torch.equal(scales, first[1])
    # writes through .data bypass the version counter: invalidate() is the documented escape hatch
    module.weight.data.mul_(-1)
    module.invalidate()
    assert torch.equal(module.ternary_weight()[0], -codes)
    module.load_state_dict({"weight": torch.randn(16, 32)})
    assert torch.equal(module.ternary_weight()[0], R.quantize_ternary(module.weight, None)[0])


def test_dense_weight_is_cached_per_update_and_dtype():
    module = TernaryLinear(32, 16, group_size=16)
    assert module.gemm == "dense" and TernaryLinear(32, 16, act_bits=8).gemm == "codes"
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    x = torch.randn(4, 32)
    module(x).square().sum().backward()
    first = module._dense
    module(x)
    assert module._dense is first  # same weight: the dequantized copy is reused across micro-batches
    codes, scales = module.ternary_weight()
    assert torch.equal(first[1], R.dequantize_ternary(codes, scales, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x)
    assert module._dense[1].dtype == torch.bfloat16  # a new copy in the compute dtype
    opt.step()
    module(x)
    assert torch.equal(module._dense[1], R.dequantize_ternary(*module.ternary_weight(), 16))
    module.invalidate()
    assert module._dense is None


def test_gemm_argument_errors():
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    with pytest.raises(ValueError, match="gemm='cutlass': expected one of"):
        T.ternary_linear(x, w, gemm="cutlass")
    with pytest.raises(ValueError, match="cannot be combined with act_bits=8"):
        TernaryLinear(32, 16, act_bits=8, gemm="dense")
    codes, scales, _ = T.ternary_quantize(w)
    with pytest.raises(ValueError, match="dequantized: expected shape"):
        T.ternary_linear_quantized(x, w, codes, scales, dequantized=torch.zeros(16, 31))


def test_training_step_reduces_loss():
    torch.manual_seed(1)
    teacher = torch.randn(8, 32)
    x = torch.randn(64, 32)
    y = x @ teacher.T
    module = TernaryLinear(32, 8, group_size=16)
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(module(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0]


@needs_triton
def test_gpt_with_ternary_linears():
    from tgolf.config import Config
    from tgolf.model import GPT

    model = GPT(Config(vocab_size=64, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1,
                            linear="ternary"))
    assert sum(isinstance(m, TernaryLinear) for m in model.modules()) == 6
    ids = torch.randint(0, 64, (2, 8))
    loss = model(ids, ids)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].mlp.proj.weight.grad.abs().sum() > 0  # fc gets 0: proj starts at 0


# ---------------------------------------------------------------------------------------------------------- convert

class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 24)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(24, 40), "proj": nn.Linear(40, 24, bias=False)})
                                    for _ in range(2))
        self.head = nn.Linear(24, 10)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block["proj"](torch.relu(block["fc"](x)))
        return self.head(x)


@pytest.mark.parametrize("skip", [("head",), ("head", "blocks.0.*"), "*.proj"])
def test_convert_swaps_exactly_the_intended_layers(skip):
    model = _Toy()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    patterns = (skip,) if isinstance(skip, str) else skip
    expected = [n for n in linears if not any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]
    model, names = tgolf.convert(model, "ternary", skip=skip, group_size=8)
    assert names == expected
    for name, old in linears.items():
        new = model.get_submodule(name)
        assert isinstance(new, TernaryLinear) == (name in expected)
        assert new.weight is old.weight  # same Parameter: optimizer state and ties survive
    assert all(model.get_submodule(n).group_size == 8 for n in expected)
    assert tgolf.convert(model, "ternary", skip=skip)[1] == []  # already converted: nothing to do


def test_convert_back_to_dense_reproduces_the_quantized_forward():
    model, _ = tgolf.convert(_Toy(), "ternary", group_size=8)
    ids = torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        quantized = model(ids)
        reference = {name: R.quantize_ternary(m.weight, 8) for name, m in model.named_modules()
                     if isinstance(m, TernaryLinear)}
    model, names = tgolf.convert(model, "dense")
    assert sorted(names) == sorted(reference)
    for name, (codes, scales) in reference.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear
        assert torch.equal(layer.weight, R.dequantize_ternary(codes, scales, 8))
    with torch.no_grad():
        assert rel(model(ids), quantized) < 1e-5
    root, names = tgolf.convert(nn.Linear(8, 4), "ternary")
    assert isinstance(root, TernaryLinear) and names == [""]
    with pytest.raises(ValueError, match="kind"):
        tgolf.convert(model, "int3")


# ---------------------------------------------------------------------------- CUDA dispatch (fake CUDA ops on the CPU)

class _FakeCudaOps:
    """Stand-ins for tgolf._C's ternary ops: assert the documented contract (tgolf/_extension.py), record each
    call, return the op's PyTorch twin. The routing in tgolf.ops.ternary is tested without a GPU."""

    def __init__(self):
        from tgolf import _extension as ext

        self.ext = ext
        self.calls: list[tuple] = []
        self.ops = {"ternary_packed_mm_cuda": self.packed_mm, "ternary_int8_linear_cuda": self.int8_linear,
                    "ternary_int8_mm_cuda": self.int8_mm}

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def packed_mm(self, x, packed, scales, group_size):
        k = x.shape[1]
        assert x.dtype == torch.bfloat16 and packed.dtype == torch.uint8 and packed.shape[1] == (k + 3) // 4
        assert group_size == 0 or (group_size > 0 and group_size % 64 == 0), group_size
        assert scales.shape == (packed.shape[0], -(-k // group_size) if group_size else 1)
        self.calls.append(("ternary_packed_mm_cuda", group_size))
        return self.ext.ternary_packed_mm_reference(x, packed, scales, group_size)

    def int8_linear(self, x, codes, scales):
        assert x.dtype == torch.bfloat16 and codes.dtype == torch.int8 and scales.shape == (codes.shape[0],)
        self.calls.append(("ternary_int8_linear_cuda", x))
        return self.ext.ternary_int8_linear_reference(x, codes, scales)

    def int8_mm(self, xq, xscale, codes, scales):
        assert xq.dtype == torch.int8 and codes.dtype == torch.int8 and xscale.shape == (xq.shape[0],)
        assert scales.dtype == torch.float32 and scales.shape == (codes.shape[0],)
        self.calls.append(("ternary_int8_mm_cuda", xq, xscale))
        return self.ext.ternary_int8_mm_reference(xq, xscale, codes, scales)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Every op with a CUDA kernel sees it as built and usable (CPU tensors stand in for CUDA ones)."""
    monkeypatch.delenv("TGOLF_BACKEND", raising=False)
    fake = _FakeCudaOps()
    real_choose = backend.choose

    def choose(device, cuda_name=None, has_triton=True):
        if cuda_name in fake.ops and backend.forced_backend() in (None, "cuda"):
            return backend.Choice("cuda", f"CUDA kernel torch.ops.tgolf.{cuda_name}")
        return real_choose(device, has_triton=has_triton)

    monkeypatch.setattr(backend, "choose", choose)
    monkeypatch.setattr(backend, "cuda_op", fake.ops.get)
    return fake


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [None, 64, 128, 16, 96, 256])
def test_packed_matmul_sends_only_contract_group_sizes_to_cuda(fake_cuda, group_size, dtype):
    k = 200  # groups of 64/128 leave a short last group; 256 ≥ K means one scale per row
    codes, scales, packed = T.ternary_quantize(torch.randn(45, k), group_size)
    x = torch.randn(5, k).to(dtype)
    got = T.packed_matmul(x, packed, scales, k, group_size)
    per_row = group_size is None or group_size >= k
    expected = [("ternary_packed_mm_cuda", 0 if per_row else group_size)]
    fits = dtype == torch.bfloat16 and (per_row or group_size % 64 == 0)
    assert fake_cuda.calls == (expected if fits else [])
    assert got.dtype == dtype
    assert rel(got, x.float() @ R.dequantize_ternary(codes, scales, group_size).T) < 1e-2
    if not fits:  # the fallback says why the CUDA kernel was not used
        op_group = 0 if per_row else group_size
        why = T._route(x.device, "ternary_packed_mm_cuda", lambda: T._packed_misfit(x, op_group))
        assert why.backend == backend.choose(x.device).backend
        assert ("multiple of 64" if op_group % 64 else "bfloat16 only") in why.reason


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group_size", [None, 16])
def test_int8_training_forward_uses_cuda_gemm_for_per_row_scales(fake_cuda, monkeypatch, group_size, bias):
    monkeypatch.setenv("TGOLF_BACKEND", "cuda")  # opt-in: measured slower than Triton on an H100
    x, w = torch.randn(37, 70), torch.randn(45, 70)
    b = torch.randn(45) if bias else torch.zeros(45)
    grad = torch.randn(37, 45)
    fn = _autocast(lambda x, w, b: T.ternary_linear(x, w, b if bias else None, group_size, 8))
    got = _run(fn, x, w, b, grad)
    ref = _run(_autocast(lambda x, w, b: R.ternary_linear_reference(x, w, b if bias else None, group_size, 8)),
               x, w, b, grad)
    for g, r in zip(got[:3], ref[:3]):
        assert rel(g, r) < 1e-2
    if group_size is not None:  # grouped scales never reach the per-row CUDA GEMM
        assert fake_cuda.calls == []
        return
    assert fake_cuda.names() == ["ternary_int8_mm_cuda"]  # not the fused op: the backward needs the int8 codes
    _, xq, xs = fake_cuda.calls[0]
    ref_q, ref_s = R.quantize_activations_int8(x.bfloat16())
    assert torch.equal(xq, ref_q) and torch.equal(xs, ref_s)
    codes, scales = R.quantize_ternary(w)
    expected = fake_cuda.ext.ternary_int8_mm_reference(ref_q, ref_s, codes, scales[:, 0])
    assert torch.equal(got[0], expected + b.bfloat16() if bias else expected)  # exactly the kernel's output


def test_int8_training_forward_in_fp32_stays_off_the_bf16_kernel(fake_cuda):
    x, w = torch.randn(9, 70), torch.randn(45, 70)
    y = T.ternary_linear(x, w, act_bits=8)
    assert fake_cuda.calls == [] and y.dtype == torch.float32
    assert rel(y, R.ternary_linear_reference(x, w, act_bits=8)) < 1e-5


def test_int8_cuda_kernels_are_opt_in(fake_cuda):
    # Measured slower than their Triton twins on an H100: by default the ops say so and run Triton (here: the
    # reference, as no Triton runs on CPU tensors without the interpreter); packed_mm keeps its CUDA kernel.
    device = torch.device("cpu")
    for name in (T._CUDA_INT8, T._CUDA_INT8_MM):
        choice = T._route(device, name, lambda: None)
        assert choice.backend != "cuda" and "measured" in choice.reason and "TGOLF_BACKEND=cuda" in choice.reason
    assert T._route(device, T._CUDA_PACKED, lambda: None).backend == "cuda"
    module = TernaryLinear(70, 45, act_bits=8)
    with torch.no_grad():
        module(torch.randn(100, 70).bfloat16())
    assert fake_cuda.calls == []
    assert "measured" in backend.OP_CHOICES["ternary.int8_linear"](device).reason


@pytest.mark.parametrize("group_size", [None, 16])
def test_int8_inference_uses_the_fused_cuda_op_for_per_row_scales(fake_cuda, monkeypatch, group_size):
    monkeypatch.setenv("TGOLF_BACKEND", "cuda")
    module = TernaryLinear(70, 45, bias=True, group_size=group_size, act_bits=8)
    x = torch.randn(80, 70).bfloat16()
    with torch.no_grad():
        got = module(x)
        want = R.ternary_linear_reference(x.float(), module.weight, module.bias, group_size, 8)
    assert fake_cuda.names() == ([] if group_size else ["ternary_int8_linear_cuda"])
    assert got.dtype == torch.bfloat16 and rel(got, want) < 1e-2


def test_info_choosers_name_the_cuda_conditions(fake_cuda, monkeypatch):
    monkeypatch.setenv("TGOLF_BACKEND", "cuda")  # the int8 kernels are opt-in
    cpu = torch.device("cpu")
    conditions = {"ternary.packed_mm": "multiple of 64", "ternary.int8_mm": "one scale per row",
                  "ternary.int8_linear": "one scale per row"}
    for name, condition in conditions.items():
        choice = backend.OP_CHOICES[name](cpu)
        assert choice.backend == "cuda" and condition in choice.reason, (name, choice)
        assert backend.choose(cpu).backend in choice.reason  # and what the other calls use
    assert backend.OP_CHOICES["ternary.linear"](cpu).backend != "cuda"
    monkeypatch.setenv("TGOLF_BACKEND", "triton")
    assert all(backend.OP_CHOICES[name](cpu).backend != "cuda" for name in conditions)


def test_bench_contest_set_holds_the_issue_targets():
    from tgolf.bench.ternary import cases

    rows = {(c.op, c.size_label): c for c in cases("contest")}
    for k, n in ((512, 1536), (1536, 512), (512, 512), (768, 3072)):
        for label in ("row", "row a8", "g128"):  # fwd+bwd vs bf16 / fake-quant / its compile; int8 fwd vs bf16
            case = rows[("ternary.ternary_linear", f"M65536 K{k} N{n} {label}")]
            assert case.grad_argnums == (0, 1) and {"cublas_bf16", "eager", "compiled"} <= set(case.anchors)
    for k, n in ((512, 1536), (1536, 512)):  # per-row int8 forward: Triton (default) vs the CUDA kernel vs cuBLAS
        assert {"cublas_bf16", "cuda"} <= set(rows[("ternary.int8_linear", f"M65536 K{k} N{n} row")].anchors)
    for k, n in ((512, 1536), (1536, 512), (512, 512), (768, 3072)):  # the dense default beside the codes GEMMs
        assert {"codes_gemm", "cached"} <= set(rows[("ternary.ternary_linear", f"M65536 K{k} N{n} row")].anchors)
    for m in (1, 4, 16):  # packed GEMV, 4096 × 4096
        assert {"cublas_bf16", "triton"} <= set(rows[("ternary.packed_matmul", f"M{m} K4096 N4096 row")].anchors)


# ------------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("act_bits, gemm", PATHS)
@pytest.mark.parametrize("group_size", [None, 128])
def test_triton_matches_reference_on_cuda(group_size, act_bits, gemm):
    x, w, b = torch.randn(300, 512, device="cuda"), torch.randn(768, 512, device="cuda") * 0.02, None
    grad = torch.randn(300, 768, device="cuda")
    codes, scales, packed = T.ternary_quantize(w, group_size)
    ref_codes, ref_scales = R.quantize_ternary(w, group_size)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales) and torch.equal(packed, T.pack2(codes))
    x_bf16 = x.bfloat16()
    assert all(torch.equal(a, b) for a, b in zip(torch.ops.tgolf.ternary_act_quant(x_bf16),
                                                 R.quantize_activations_int8(x_bf16)))
    b = torch.randn(768, device="cuda")
    got = _run(_autocast(lambda x, w, b: T.ternary_linear(x, w, b, group_size, act_bits, gemm), "cuda"),
               x, w, b, grad)
    ref = _run(_autocast(lambda x, w, b: R.ternary_linear_reference(x, w, b, group_size, act_bits), "cuda"),
               x, w, b, grad)
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-2
    dense = R.dequantize_ternary(codes, scales, group_size)
    for m in (1, 3, 17, 64):
        xs = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        assert rel(T.packed_matmul(xs, packed, scales, 512, group_size), xs.float() @ dense.T) < 1e-2
        xq, sx = R.quantize_activations_int8(xs)
        assert rel(T.int8_linear(xs, codes, scales, None, group_size), (xq.float() * sx[:, None]) @ dense.T) < 1e-2


@pytest.mark.gpu
def test_gpu_compiled_act_bits_8_quantizes_inside_the_norm_kernel():
    """On the GPU: inductor's code for the reference's int8 quantization equals the op bit for bit, and
    compiled, the quantization sits in the RMSNorm's Triton kernel."""
    spread = torch.logspace(-3, 3, 1000, device="cuda")[:, None]
    x = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16) * spread
    compiled = torch.compile(R.quantize_activations_int8, fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(compiled(x), torch.ops.tgolf.ternary_act_quant(x)))
    out, want, code, kernels = gpu_layer_after_norm(_norm_then_int8_layer)
    assert rel(out, want) < 1e-2
    assert norm_kernel_with(kernels, "amax"), kernels
    assert "ternary_act_quant" not in code


@pytest.mark.gpu
def test_cuda_routing_on_the_gpu(monkeypatch):
    """With tgolf._C built: every group size works (those the packed kernel does not take fall back), and the
    per-row act_bits=8 training forward, with the opt-in CUDA kernel asked for, is exactly its output."""
    if backend.cuda_op("ternary_int8_mm_cuda") is None or backend.cuda_op("ternary_packed_mm_cuda") is None:
        pytest.skip("tgolf._C was not built")
    from tgolf import _extension as ext

    w = torch.randn(96, 200, device="cuda") * 0.05
    for group_size in (None, 16, 64, 96, 128):
        codes, scales, packed = T.ternary_quantize(w, group_size)
        x = torch.randn(5, 200, device="cuda", dtype=torch.bfloat16)
        dense = R.dequantize_ternary(codes, scales, group_size)
        assert rel(T.packed_matmul(x, packed, scales, 200, group_size), x.float() @ dense.T) < 1e-2
    x = torch.randn(300, 200, device="cuda", dtype=torch.bfloat16)
    codes, scales = R.quantize_ternary(w)
    expected = ext.ternary_int8_mm_reference(*R.quantize_activations_int8(x), codes, scales[:, 0])
    monkeypatch.setenv("TGOLF_BACKEND", "cuda")
    assert torch.equal(T.ternary_linear(x, w, act_bits=8), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["dense", "codes"])
def test_module_training_step_on_cuda(gemm):
    """TernaryLinear on the GPU under autocast, each GEMM path: output and all gradients against the reference, over
    two micro-batches (the second one reuses the cached quantization)."""
    module = TernaryLinear(512, 768, bias=True, gemm=gemm).cuda()
    for _ in range(2):
        x, grad = torch.randn(300, 512, device="cuda"), torch.randn(300, 768, device="cuda")
        module.zero_grad()
        got = _run(_autocast(lambda x, w, b: module(x), "cuda"), x, module.weight, module.bias, grad)
        got = (got[0], got[1], module.weight.grad, module.bias.grad)
        ref = _run(_autocast(lambda x, w, b: R.ternary_linear_reference(x, w, b), "cuda"), x, module.weight,
                   module.bias, grad)
        for g, r in zip(got, ref):
            assert rel(g, r) < 1e-2
