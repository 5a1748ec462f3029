"""FusedMLP and tgolf.ops.mlp.fused_mlp against the reference MLP: outputs and all gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tgolf.backend import choose
from tgolf.nn import make_mlp
from tgolf.nn.mlp import MLP, FusedMLP
from tgolf.ops.mlp import fused_mlp
from tgolf.ops.mlp.reference import activation_slope, mlp_reference, sq_act_grad_reference

ACTIVATIONS = ["relu2", "leaky_relu2"]
# (leading shape of x, dim, hidden): none a multiple of the interpreter's 32-wide tiles
SHAPES = [((2, 37), 40, 70), ((45,), 33, 97)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _pair(dim: int, hidden: int, activation: str) -> tuple[MLP, FusedMLP]:
    fused = FusedMLP(dim, hidden, activation=activation, negative_slope=0.3)
    nn.init.normal_(fused.proj.weight, std=0.05)  # off zero, so the proj gradient paths can fail
    ref = MLP(dim, hidden, activation=activation, negative_slope=0.3)
    ref.load_state_dict(fused.state_dict())
    return ref, fused


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,dim,hidden", SHAPES)
def test_fused_mlp_matches_reference_fp32(activation, lead, dim, hidden):
    ref, fused = _pair(dim, hidden, activation)
    x = torch.randn(*lead, dim, requires_grad=True)
    out, out_ref = fused(x), ref(x)
    assert out.shape == out_ref.shape
    assert rel(out, out_ref) < 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, fused.fc.weight, fused.proj.weight), grad)
    want = torch.autograd.grad(out_ref, (x, ref.fc.weight, ref.proj.weight), grad)
    for g, w, name in zip(got, want, ("x", "fc.weight", "proj.weight")):
        assert rel(g, w) < 1e-5, name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_mlp_bf16(activation):
    m, dim, hidden = 50, 40, 70
    x = torch.randn(m, dim, requires_grad=True)
    fc = (torch.randn(hidden, dim) / dim ** 0.5).requires_grad_()
    proj = (torch.randn(dim, hidden) / hidden ** 0.5).requires_grad_()
    bf = [t.detach().bfloat16().requires_grad_() for t in (x, fc, proj)]
    out = fused_mlp(*bf, activation=activation, negative_slope=0.5)
    out_ref = mlp_reference(x, fc, proj, activation, 0.5)
    assert out.dtype == torch.bfloat16 and rel(out, out_ref) < 1e-2
    grad = torch.randn_like(out_ref)
    got = torch.autograd.grad(out, bf, grad.bfloat16())
    want = torch.autograd.grad(out_ref, (x, fc, proj), grad)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and rel(g, w) < 1e-2


@pytest.mark.skipif(choose(torch.device("cpu")).backend != "triton", reason="Triton interpreter not active")
@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_kernels_write_every_element(slope):
    from tgolf.kernels.mlp import gemm_sq_act, gemm_sq_act_grad

    m, dim, hidden = 67, 35, 66
    x, fc, proj = torch.randn(m, dim), torch.randn(hidden, dim), torch.randn(dim, hidden)
    a = torch.full((m, hidden), float("nan"))
    h = torch.full((m, hidden), float("nan"))
    gemm_sq_act(x, fc, slope, a=a, h=h)
    h_ref = x @ fc.t()
    assert rel(h, h_ref) < 1e-5
    assert rel(a, torch.nn.functional.leaky_relu(h_ref, slope).square()) < 1e-5
    grad_out = torch.randn(m, dim)
    dh = torch.full((m, hidden), float("nan"))
    gemm_sq_act_grad(grad_out, proj, h, slope, out=dh)
    assert rel(dh, sq_act_grad_reference(grad_out, proj, h, slope)) < 1e-5


@pytest.mark.skipif(choose(torch.device("cpu")).backend != "triton", reason="Triton interpreter not active")
@pytest.mark.parametrize("index", range(5))
def test_every_gpu_autotune_config_on_the_interpreter(index):
    """Each tile the GPU's autotuner may pick (the tests above use the interpreter's small tile), forward and
    backward, on shapes spanning two M and N tiles with ragged edges and three K steps."""
    from tgolf.kernels.mlp import _GPU_CONFIGS, gemm_sq_act, gemm_sq_act_grad

    assert len(_GPU_CONFIGS) == 5, "parametrize over every config"
    meta = _GPU_CONFIGS[index].kwargs
    m, dim, hidden = meta["BLOCK_M"] + 3, 2 * meta["BLOCK_K"] + 5, meta["BLOCK_N"] + 7
    x, fc, proj = torch.randn(m, dim), torch.randn(hidden, dim), torch.randn(dim, hidden)
    a = torch.full((m, hidden), float("nan"))
    h = torch.full((m, hidden), float("nan"))
    gemm_sq_act(x, fc, 0.5, a=a, h=h, config=meta)
    h_ref = x @ fc.t()
    assert rel(h, h_ref) < 1e-5
    assert rel(a, torch.nn.functional.leaky_relu(h_ref, 0.5).square()) < 1e-5
    grad_out = torch.randn(m, dim)
    dh = gemm_sq_act_grad(grad_out, proj, h, 0.5, out=torch.full((m, hidden), float("nan")), config=meta)
    assert rel(dh, sq_act_grad_reference(grad_out, proj, h, 0.5)) < 1e-5


def test_gradient_matches_autograd_of_activation():
    """sq_act_grad_reference is the derivative autograd gives for the reference activation."""
    h = torch.randn(20, 30, requires_grad=True)
    grad_out, proj = torch.randn(20, 8), torch.randn(8, 30)
    for activation in ACTIVATIONS:
        a = mlp_reference(h, torch.eye(30), proj, activation, 0.25)
        (want,) = torch.autograd.grad(a, h, grad_out)
        got = sq_act_grad_reference(grad_out, proj, h.detach(), activation_slope(activation, 0.25))
        assert rel(got, want) < 1e-6


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("TGOLF_BACKEND", "reference")
    ref, fused = _pair(24, 40, "leaky_relu2")
    x = torch.randn(9, 24, requires_grad=True)
    out, out_ref = fused(x), ref(x)
    assert rel(out, out_ref) < 1e-5
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_ref,) = torch.autograd.grad(out_ref.sum(), x)
    assert rel(gx, gx_ref) < 1e-5


def test_module_contract():
    fused = make_mlp("fused", 16, 32, activation="relu2", negative_slope=0.5, linear="bf16")
    assert isinstance(fused, FusedMLP) and fused.proj.zero_init
    assert set(fused.state_dict()) == {"fc.weight", "proj.weight"}
    MLP(16, 32).load_state_dict(fused.state_dict())
    with pytest.raises(ValueError, match="activation"):
        FusedMLP(16, 32, activation="gelu")


def test_quantized_linear_falls_back_to_module_linears():
    class CountingLinear(nn.Linear):  # stands for a quantized drop-in (a subclass with its own forward)
        calls = 0

        def forward(self, x):
            CountingLinear.calls += 1
            return super().forward(x)

    fused = FusedMLP(16, 32, activation="leaky_relu2")
    ref = MLP(16, 32, activation="leaky_relu2")
    for name in ("fc", "proj"):
        old = getattr(fused, name)
        new = CountingLinear(old.in_features, old.out_features, bias=False)
        nn.init.normal_(new.weight)
        setattr(fused, name, new)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(5, 16)
    assert rel(fused(x), ref(x)) < 1e-6 and CountingLinear.calls == 2


def test_autocast_runs_in_autocast_dtype():
    ref, fused = _pair(32, 64, "relu2")
    x = torch.randn(40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = fused(x), ref(x)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert rel(out, out_ref) < 1e-2


def test_torch_compile_fullgraph():
    ref, fused = _pair(24, 40, "leaky_relu2")
    x = torch.randn(2, 11, 24, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel(out, ref(x)) < 1e-5
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(ref(x).square().sum(), x)
    assert rel(gx, gx_ref) < 1e-5


def test_bad_arguments():
    x, fc, proj = torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match="activation"):
        fused_mlp(x, fc, proj, activation="swish")
    with pytest.raises(ValueError, match=r"x \(4, 9\).*fc_weight \(16, 8\)"):
        fused_mlp(torch.randn(4, 9), fc, proj)
    with pytest.raises(ValueError, match=r"proj_weight \(8, 15\).*fc_weight \(16, 8\)"):
        fused_mlp(x, fc, torch.randn(8, 15))
    with pytest.raises(TypeError, match="dtype"):
        fused_mlp(x, fc.double(), proj)
    with pytest.raises(TypeError, match="floating-point"):
        fused_mlp(x.long(), fc, proj)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_mlp_gpu_bf16(activation):
    m, dim, hidden = 4096 + 17, 512, 1536 + 64
    x = torch.randn(m, dim, device="cuda", requires_grad=True)
    fc = (torch.randn(hidden, dim, device="cuda") / dim ** 0.5).requires_grad_()
    proj = (torch.randn(dim, hidden, device="cuda") / hidden ** 0.5).requires_grad_()
    bf = [t.detach().bfloat16().requires_grad_() for t in (x, fc, proj)]
    out = fused_mlp(*bf, activation=activation)
    out_ref = mlp_reference(x, fc, proj, activation)
    assert rel(out, out_ref) < 1e-2
    grad = torch.randn_like(out_ref)
    got = torch.autograd.grad(out, bf, grad.bfloat16())
    want = torch.autograd.grad(out_ref, (x, fc, proj), grad)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-2
