"""Fused MLP op: ``proj(act(fc(x)))`` with the up-projection and squared activation in one Triton GEMM.

``fused_mlp(x, fc_weight, proj_weight, activation="relu2"|"leaky_relu2", negative_slope=0.5)``.

Forward (``tgolf::fused_mlp_fwd``): one kernel computes ``h = x @ W_fcᵀ`` and writes ``a = act(h)`` and ``h``
(saved for the backward, like the reference saves relu(h)); ``out = a @ W_projᵀ`` is cuBLAS.
Backward: ``dh = (grad_out @ W_proj) * act'(h)`` in one kernel (``tgolf::mlp_sq_act_grad``, the activation's
gradient is the GEMM's epilogue), then three cuBLAS GEMMs: ``dx = dh @ W_fc``, ``dW_fc = dhᵀ @ x``,
``dW_proj = grad_outᵀ @ a``. Backends: Triton (GPU, or the CPU under TRITON_INTERPRET=1), else the PyTorch
composition; there is no CUDA C++ kernel for this family. No double backward. fp32 inputs run the
Triton GEMM in TF32 on the GPU (relative error ~1e-3); training runs it in bf16.
"""
from __future__ import annotations

import torch

from tgolf.backend import choose, register_op
from tgolf.ops.mlp.reference import activation_slope, mlp_reference, sq_act_grad_reference

__all__ = ["fused_mlp", "mlp_reference"]


def _use_triton(device: torch.device) -> bool:
    return choose(device).backend == "triton"


@torch.library.custom_op("tgolf::fused_mlp_fwd", mutates_args=())
def _fused_mlp_fwd(x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor,
                   slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [M, Dout], a = act(h) [M, H], h [M, H]) for x [M, D]."""
    if _use_triton(x.device):
        from tgolf.kernels.mlp import gemm_sq_act

        a, h = gemm_sq_act(x, fc_weight, slope)
    else:
        h = x @ fc_weight.t()
        a = torch.nn.functional.leaky_relu(h, slope).square()
    return a @ proj_weight.t(), a, h


@_fused_mlp_fwd.register_fake
def _(x, fc_weight, proj_weight, slope):
    m, hidden = x.shape[0], fc_weight.shape[0]
    return x.new_empty(m, proj_weight.shape[0]), x.new_empty(m, hidden), x.new_empty(m, hidden)


@torch.library.custom_op("tgolf::mlp_sq_act_grad", mutates_args=())
def _mlp_sq_act_grad(grad_out: torch.Tensor, proj_weight: torch.Tensor, h: torch.Tensor,
                     slope: float) -> torch.Tensor:
    """``(grad_out @ proj_weight) * act'(h)``: the gradient of the fc output."""
    if _use_triton(grad_out.device):
        from tgolf.kernels.mlp import gemm_sq_act_grad

        return gemm_sq_act_grad(grad_out, proj_weight, h, slope)
    return sq_act_grad_reference(grad_out, proj_weight, h, slope)


@_mlp_sq_act_grad.register_fake
def _(grad_out, proj_weight, h, slope):
    return torch.empty_like(h)


def _setup_context(ctx, inputs, output) -> None:
    x, fc_weight, proj_weight, slope = inputs
    _, a, h = output
    ctx.save_for_backward(x, fc_weight, proj_weight, a, h)
    ctx.slope = slope


def _backward(ctx, grad_out, _grad_a, _grad_h):
    x, fc_weight, proj_weight, a, h = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    need_x, need_fc, need_proj = ctx.needs_input_grad[:3]
    grad_x = grad_fc = grad_proj = None
    if need_x or need_fc:
        dh = torch.ops.tgolf.mlp_sq_act_grad(grad_out, proj_weight, h, ctx.slope)
        grad_x = dh @ fc_weight if need_x else None
        grad_fc = dh.t() @ x if need_fc else None
    if need_proj:
        grad_proj = grad_out.t() @ a
    return grad_x, grad_fc, grad_proj, None


_fused_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor) -> None:
    for name, t in (("x", x), ("fc_weight", fc_weight), ("proj_weight", proj_weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__} "
                            f"{getattr(t, 'dtype', '')}")
    if fc_weight.dim() != 2 or proj_weight.dim() != 2 or x.dim() < 1:
        raise ValueError(f"fc_weight and proj_weight must be 2-D, x at least 1-D; got x {tuple(x.shape)}, "
                         f"fc_weight {tuple(fc_weight.shape)}, proj_weight {tuple(proj_weight.shape)}")
    if x.shape[-1] != fc_weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and fc_weight {tuple(fc_weight.shape)}: x's last dimension must "
                         f"equal fc_weight.shape[1] (fc_weight is [hidden, dim])")
    if proj_weight.shape[1] != fc_weight.shape[0]:
        raise ValueError(f"proj_weight {tuple(proj_weight.shape)} and fc_weight {tuple(fc_weight.shape)}: "
                         f"proj_weight.shape[1] must equal fc_weight.shape[0] (the hidden width)")
    if not (x.dtype == fc_weight.dtype == proj_weight.dtype):
        raise TypeError(f"x, fc_weight and proj_weight must share a dtype, got {x.dtype}, {fc_weight.dtype}, "
                        f"{proj_weight.dtype}")
    if not (x.device == fc_weight.device == proj_weight.device):
        raise ValueError(f"x, fc_weight and proj_weight must be on one device, got {x.device}, "
                         f"{fc_weight.device}, {proj_weight.device}")


def fused_mlp(x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor, activation: str = "relu2",
              negative_slope: float = 0.5) -> torch.Tensor:
    """``proj(act(fc(x)))`` like :func:`mlp_reference`: x [..., D], fc_weight [H, D], proj_weight [Dout, H].

    All three in one dtype (the caller casts for autocast, see tgolf.nn.FusedMLP).
    """
    slope = activation_slope(activation, negative_slope)
    _check(x, fc_weight, proj_weight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out, _, _ = torch.ops.tgolf.fused_mlp_fwd(x2, fc_weight.contiguous(), proj_weight.contiguous(), slope)
    return out.view(*lead, proj_weight.shape[0])


register_op("mlp.fused_mlp", lambda device: choose(device))
