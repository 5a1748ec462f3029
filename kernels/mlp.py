"""Triton kernels of the fused MLP: a GEMM whose epilogue applies the squared (leaky) ReLU, and its backward.

The squared activation with slope ``s`` (``s = 0`` is relu²) is ``act(h) = (h if h > 0 else s·h)²`` and its
derivative is ``act'(h) = 2·h·(1 if h > 0 else s²)``.

* forward: ``h = x @ W_fcᵀ`` accumulated in fp32; the epilogue writes ``a = act(h)`` (the proj GEMM's input) and
  ``h`` (saved for the backward), so the activation never makes a separate bf16 round trip through memory.
* backward: ``dh = (grad_out @ W_proj) * act'(h)``; the epilogue reads the saved ``h`` tile, so the gradient of
  ``a`` is never written out.

Both are one kernel, ``_gemm_sq_act_kernel``, computing ``C = A @ B`` with A [M, K] and B [K, N] given by strides
(so ``W_fcᵀ`` is a strided view, never a copy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgolf.backend import triton_interpret
from tgolf.kernels.common import output_tile

# Hopper-friendly tiles from the Triton matmul tutorial; the choice is made once per (M, N, K) by the autotuner on
# the first call (a training run's compile warm-up), never in timed steps. Needs measuring on a GPU.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
# Small tiles under the CPU interpreter, so that test shapes span several tiles with ragged edges.
_INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


@triton.jit
def _gemm_sq_act_kernel(a_ptr, b_ptr, h_ptr, out_ptr, M, N, K,
                        stride_am, stride_ak, stride_bk, stride_bn, stride_hm, stride_hn, stride_om, stride_on,
                        slope,
                        BACKWARD: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn, mask_m, mask_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        if UPCAST:  # bf16 tl.dot is wrong in the CPU interpreter (triton issue 11584)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = mask_m[:, None] & mask_n[None, :]
    h_ptrs = h_ptr + rm[:, None].to(tl.int64) * stride_hm + rn[None, :] * stride_hn
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    if BACKWARD:
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        dh = acc * (2.0 * h) * tl.where(h > 0, 1.0, slope * slope)
        tl.store(out_ptrs, dh.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        r = acc * tl.where(acc > 0, 1.0, slope)
        tl.store(out_ptrs, (r * r).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)


_gemm_sq_act_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["M", "N", "K", "BACKWARD"])(_gemm_sq_act_kernel)


def _launch(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, out: torch.Tensor, slope: float,
            backward: bool, config: dict | None) -> None:
    (m, k), n = a.shape, b.shape[1]
    args = (a, b, h, out, m, n, k, *a.stride(), *b.stride(), *h.stride(), *out.stride(), float(slope))
    interpret = triton_interpret()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    meta = config or (_INTERPRET_META if interpret else None)
    if meta is None:  # the GPU: autotuned over _GPU_CONFIGS
        _gemm_sq_act_tuned[grid](*args, BACKWARD=backward, UPCAST=False)
    else:
        _gemm_sq_act_kernel[grid](*args, BACKWARD=backward, UPCAST=interpret and a.dtype != torch.float32, **meta)


def gemm_sq_act(x: torch.Tensor, fc_weight: torch.Tensor, negative_slope: float,
                a: torch.Tensor | None = None, h: torch.Tensor | None = None, config: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x @ fc_weightᵀ``, ``a = act(h)``: x [M, D], fc_weight [H, D] → (a, h), both [M, H] in x's dtype.

    ``a`` and ``h`` may be given (tests poison them with NaN); ``negative_slope`` 0 is relu². ``config`` (block
    sizes, e.g. one of _GPU_CONFIGS' kwargs) replaces the autotuner (tests, tuning).
    """
    m, hidden = x.shape[0], fc_weight.shape[0]
    a = torch.empty(m, hidden, device=x.device, dtype=x.dtype) if a is None else a
    h = torch.empty(m, hidden, device=x.device, dtype=x.dtype) if h is None else h
    _launch(x, fc_weight.t(), h, a, negative_slope, backward=False, config=config)
    return a, h


def gemm_sq_act_grad(grad_out: torch.Tensor, proj_weight: torch.Tensor, h: torch.Tensor, negative_slope: float,
                     out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``dh = (grad_out @ proj_weight) * act'(h)``: grad_out [M, Dout], proj_weight [Dout, H], h [M, H] → [M, H]."""
    out = torch.empty_like(h) if out is None else out
    _launch(grad_out, proj_weight, h, out, negative_slope, backward=True, config=config)
    return out
