"""Ternary linear layers (BitNet b1.58): public functions, torch.library ops, backend choice and autograd.

Ops under ``torch.ops.tgolf`` (each with a fake implementation, so torch.compile traces them; each picks its
backend per call with ``tgolf.backend.choose``):

* ``ternary_quantize(w, group_size) -> (codes int8 [N, K], scales f32 [N, G], packed uint8 [N, ⌈K/4⌉])``
* ``ternary_mm(x, codes, scales, bias?, group_size) -> x @ Wqᵀ + bias`` in x's dtype, codes read directly
* ``ternary_mm_grad_input(g, codes, scales, group_size) -> g @ Wq``
* ``ternary_act_quant(x) -> (codes int8 [M, K], scales f32 [M])``, per-token absmax
* ``ternary_int8_mm(xq, xs, codes, scales, bias?, group_size, out_dtype)``: int8 × int8 → int32, scales after
* ``ternary_int8_linear(x, codes, scales, bias?, group_size)``: act quant + int8 GEMM, no autograd (inference)
* ``ternary_packed_mm(x, packed, scales, in_features, group_size)``: 2-bit weights, small M (decoding)

``group_size`` 0 means one scale per row. The int8 path quantizes activations before the GEMM rather than in
its prologue: a prologue would recompute each token's absmax once per column block, and the backward needs the
int8 codes anyway (the weight gradient is ``(g·s_x)ᵀ @ x_codes``), so writing them costs nothing extra. Eagerly
that is ``ternary_act_quant``'s kernel; under torch.compile it is the reference's torch ops, which inductor fuses
into the kernel producing x (an RMSNorm, an activation): x is then read once, and never written in bf16 for the
GEMM's sake.
The weight gradient is a plain dense GEMM (no quantized operand: the STE hands the latent weight the gradient of
the dequantized one) reduced over all tokens, so it goes to cuBLAS via torch.matmul.

CUDA kernels (tgolf/_extension.py has their contracts) are used only where their contract holds; otherwise the op
runs its Triton kernel (or the reference), and ``_route`` says why in the Choice's reason:

* ``ternary_packed_mm`` → ``ternary_packed_mm_cuda`` for bf16 x with one scale per row or group_size a multiple
  of 64;
* ``ternary_int8_mm`` (the training forward with ``act_bits=8``, after this family's activation quantization, whose
  codes the backward reuses) → ``ternary_int8_mm_cuda`` for one scale per row and a bf16 output;
* ``ternary_int8_linear`` (inference) → ``ternary_int8_linear_cuda`` (activation quantization fused) for one scale
  per row and bf16 x.

The two int8 CUDA kernels are opt-in (``TGOLF_BACKEND=cuda``): on an H100 they were measured slower than the
Triton kernels (``_CUDA_OPT_IN`` has the figures), so by default those ops run on Triton.

Grouped scales never reach the int8 CUDA ops (they take one scale per row): grouped int8 runs on Triton (group sizes
that are multiples of 16) or the reference. The CUDA ops add no bias; it is added after them, in the output dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tgolf import backend
# The straight-through dense GEMM (cuBLAS with a dequantized copy; the latent weight gets the gradient) is QAT's.
from tgolf.ops.quant import qat_dense_matmul as dense_ste_matmul
from tgolf.ops.ternary.packing import pack2, packed_length, unpack2
from tgolf.ops.ternary.reference import (check_act_bits, dequantize_ternary, group_count, quantize_activations_int8,
                                         quantize_ternary, ternary_linear_reference)

TERNARY_GEMMS = ("dense", "codes")  # cuBLAS on a dequantized copy, or Triton GEMMs reading the int8 codes
PACKED_MAX_M = 64  # up to this many tokens, inference reads the 2-bit weights (memory-bound regime)
_CUDA_PACKED = "ternary_packed_mm_cuda"
_CUDA_INT8 = "ternary_int8_linear_cuda"
_CUDA_INT8_MM = "ternary_int8_mm_cuda"
# CUDA kernels measured slower than their Triton twins (H100, profiles/2026-11-27-NVIDIA-H100-80GB-HBM3, M = 65,536,
# K×N 512×1536 / 1536×512 ...): they run only when asked for with TGOLF_BACKEND=cuda.
_CUDA_OPT_IN = {
    _CUDA_INT8: "measured 4× slower than the Triton kernel on an H100 (1.39 vs 0.34 ms at M=65,536 K=512 N=1536)",
    _CUDA_INT8_MM: "measured slower than the Triton kernel on an H100 at 3 of the 4 contest shapes "
                   "(0.45 vs 0.36 ms at M=65,536 K=512 N=1536)",
}
_CUDA_PACKED_GROUP = 64  # the packed CUDA kernel's group sizes: 0 (per row) or a multiple of this
# Largest M each CUDA kernel's grid takes (row blocks of 64 / 128 in grid dimension y, at most 65535 of them).
_CUDA_PACKED_MAX_M = 64 * 65535
_CUDA_INT8_MAX_M = 128 * 65535

__all__ = ["ternary_linear", "ternary_linear_quantized", "dense_weight", "default_gemm", "check_gemm",
           "TERNARY_GEMMS", "ternary_quantize", "packed_matmul", "int8_linear", "pack2", "unpack2",
           "quantize_ternary", "dequantize_ternary", "quantize_activations_int8", "ternary_linear_reference",
           "PACKED_MAX_M"]


def _kernels():
    from tgolf.kernels import ternary as kernels  # imported on first use: triton only where a kernel runs

    return kernels


def _choice(device: torch.device, cuda_name: str | None = None) -> str:
    return backend.choose(device, cuda_name=cuda_name).backend


def _unless_opt_in(device: torch.device, cuda_name: str | None) -> backend.Choice:
    """The op's backend with its CUDA kernel ``cuda_name``; where that kernel was measured slower than its Triton
    twin (opt-in) and TGOLF_BACKEND=cuda does not ask for it, what the op uses without it, saying why."""
    choice = backend.choose(device, cuda_name=cuda_name)
    if choice.backend != "cuda" or cuda_name not in _CUDA_OPT_IN or backend.forced_backend() == "cuda":
        return choice
    other = backend.choose(device)
    return backend.Choice(other.backend, f"{other.reason}; not {cuda_name}: {_CUDA_OPT_IN[cuda_name]} "
                                         "(TGOLF_BACKEND=cuda uses it)")


def _route(device: torch.device, cuda_name: str, misfit: Callable[[], str | None]) -> backend.Choice:
    """The backend for one call of an op with a CUDA kernel: that kernel when it exists, is not opt-in, and
    ``misfit()`` (why this call breaks the kernel's contract, or None) finds nothing, else what the op would use
    without it."""
    choice = _unless_opt_in(device, cuda_name)
    if choice.backend != "cuda":
        return choice
    why = misfit()
    if why is None:
        return choice
    other = backend.choose(device)
    return backend.Choice(other.backend, f"{other.reason}; not {cuda_name}: {why}")


def _bf16_misfit(name: str, dtype: torch.dtype) -> str | None:
    return None if dtype == torch.bfloat16 else f"{name} is {dtype}, the kernel handles bfloat16 only"


def _rows_misfit(m: int, limit: int) -> str | None:
    return None if m <= limit else f"M={m} is above the kernel's {limit} rows"


def _per_row_misfit(scales: torch.Tensor) -> str | None:
    return None if scales.shape[1] == 1 else f"{scales.shape[1]} scale groups per row, the kernel takes one"


def _packed_misfit(x: torch.Tensor, group_size: int) -> str | None:
    if group_size % _CUDA_PACKED_GROUP:
        return f"group_size={group_size} is not a multiple of {_CUDA_PACKED_GROUP}"
    return _bf16_misfit("x", x.dtype) or _rows_misfit(x.shape[0], _CUDA_PACKED_MAX_M)


def _int8_mm_misfit(xq: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    return (_per_row_misfit(scales) or _bf16_misfit("the output", out_dtype)
            or _rows_misfit(xq.shape[0], _CUDA_INT8_MAX_M))


def _int8_linear_misfit(x: torch.Tensor, scales: torch.Tensor) -> str | None:
    return _per_row_misfit(scales) or _bf16_misfit("x", x.dtype) or _rows_misfit(x.shape[0], _CUDA_INT8_MAX_M)


def _plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def _gs(group_size: int, in_features: int) -> int | None:
    """Op-level group size (0 = per row) → reference-level (None = per row)."""
    return None if group_size == 0 or group_size >= in_features else group_size


def _kernel_gs(group_size: int, in_features: int) -> int:
    """Op-level group size → the kernels' (in_features for one scale per row)."""
    return in_features if group_size == 0 else min(group_size, in_features)


# ------------------------------------------------------------------------------------------------------- the ops

@torch.library.custom_op("tgolf::ternary_quantize", mutates_args=())
def _quantize_op(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = w.shape[1]
    if _choice(w.device) == "triton":
        return _kernels().quantize_weight(w.contiguous(), _kernel_gs(group_size, k))
    codes, scales = quantize_ternary(w, _gs(group_size, k))
    return codes, scales, pack2(codes)


@_quantize_op.register_fake
def _(w, group_size):
    n, k = w.shape
    groups = group_count(k, _gs(group_size, k))
    return (w.new_empty((n, k), dtype=torch.int8), w.new_empty((n, groups), dtype=torch.float32),
            w.new_empty((n, packed_length(k)), dtype=torch.uint8))


@torch.library.custom_op("tgolf::ternary_mm", mutates_args=())
def _mm_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
           group_size: int) -> torch.Tensor:
    k = codes.shape[1]
    if _choice(x.device) == "triton":
        kn = _kernels()
        return kn.ternary_mm(x, codes, scales, _kernel_gs(group_size, k), kn.MODE_FORWARD, k, bias=bias,
                             interpret=backend.triton_interpret())
    w = dequantize_ternary(codes, scales, _gs(group_size, k)).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@_mm_op.register_fake
def _(x, codes, scales, bias, group_size):
    return x.new_empty((x.shape[0], codes.shape[0]))


@torch.library.custom_op("tgolf::ternary_mm_grad_input", mutates_args=())
def _mm_grad_input_op(g: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    k = codes.shape[1]
    if _choice(g.device) == "triton":
        kn = _kernels()
        return kn.ternary_mm(g, codes, scales, _kernel_gs(group_size, k), kn.MODE_GRAD_INPUT, k,
                             interpret=backend.triton_interpret())
    return g @ dequantize_ternary(codes, scales, _gs(group_size, k)).to(g.dtype)


@_mm_grad_input_op.register_fake
def _(g, codes, scales, group_size):
    return g.new_empty((g.shape[0], codes.shape[1]))


@torch.library.custom_op("tgolf::ternary_act_quant", mutates_args=())
def _act_quant_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _choice(x.device) == "triton":
        return _kernels().quantize_activations(x)
    return quantize_activations_int8(x)


@_act_quant_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _int8_mm_reference(xq, xs, codes, scales, bias, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Same operation order as the kernel: integer products (exact in float64), fp32 scales, then bias."""
    k = codes.shape[1]
    gs = _kernel_gs(group_size, k)
    acc = torch.zeros((xq.shape[0], codes.shape[0]), dtype=torch.float32, device=xq.device)
    for g, k0 in enumerate(range(0, k, gs)):
        part = (xq[:, k0:k0 + gs].double() @ codes[:, k0:k0 + gs].double().T).float()
        acc = part * scales[:, 0] if scales.shape[1] == 1 else acc + part * scales[:, g]
    acc = acc * xs[:, None]
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def _int8_mm_any(xq, xs, codes, scales, bias, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    k = codes.shape[1]
    choice = _route(xq.device, _CUDA_INT8_MM, lambda: _int8_mm_misfit(xq, scales, out_dtype)).backend
    if choice == "cuda":
        return _plus_bias(backend.cuda_op(_CUDA_INT8_MM)(xq, xs, codes, scales.reshape(-1)), bias)
    kn = _kernels() if choice == "triton" else None
    if kn is not None and kn.int8_block_k(_kernel_gs(group_size, k), k) is not None:
        return kn.int8_mm(xq, xs, codes, scales, _kernel_gs(group_size, k), out_dtype, bias=bias,
                          interpret=backend.triton_interpret())
    return _int8_mm_reference(xq, xs, codes, scales, bias, group_size, out_dtype)


@torch.library.custom_op("tgolf::ternary_int8_mm", mutates_args=())
def _int8_mm_op(xq: torch.Tensor, xs: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _int8_mm_any(xq, xs, codes, scales, bias, group_size, out_dtype)


@_int8_mm_op.register_fake
def _(xq, xs, codes, scales, bias, group_size, out_dtype):
    return xq.new_empty((xq.shape[0], codes.shape[0]), dtype=out_dtype)


def _int8_linear_any(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                     group_size: int) -> torch.Tensor:
    if _route(x.device, _CUDA_INT8, lambda: _int8_linear_misfit(x, scales)).backend == "cuda":
        return _plus_bias(backend.cuda_op(_CUDA_INT8)(x, codes, scales.reshape(-1)), bias)
    xq, xs = _act_quant_op(x)
    return _int8_mm_any(xq, xs, codes, scales, bias, group_size, x.dtype)


@torch.library.custom_op("tgolf::ternary_int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                    group_size: int) -> torch.Tensor:
    return _int8_linear_any(x, codes, scales, bias, group_size)


@_int8_linear_op.register_fake
def _(x, codes, scales, bias, group_size):
    return x.new_empty((x.shape[0], codes.shape[0]))


def _packed_mm_any(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                   group_size: int) -> torch.Tensor:
    choice = _route(x.device, _CUDA_PACKED, lambda: _packed_misfit(x, group_size)).backend
    if choice == "cuda":  # group_size is 0 exactly when scales has one column (see _inference_args)
        return backend.cuda_op(_CUDA_PACKED)(x, packed, scales, group_size)
    if choice == "triton":
        kn = _kernels()
        return kn.ternary_mm(x, packed, scales, _kernel_gs(group_size, in_features), kn.MODE_PACKED, in_features,
                             interpret=backend.triton_interpret())
    w = dequantize_ternary(unpack2(packed, in_features), scales, _gs(group_size, in_features))
    return F.linear(x, w.to(x.dtype))


@torch.library.custom_op("tgolf::ternary_packed_mm", mutates_args=())
def _packed_mm_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                  group_size: int) -> torch.Tensor:
    return _packed_mm_any(x, packed, scales, in_features, group_size)


@_packed_mm_op.register_fake
def _(x, packed, scales, in_features, group_size):
    return x.new_empty((x.shape[0], packed.shape[0]))


def _chooser(cuda_name: str | None = None, condition: str = "") -> Callable[[torch.device], backend.Choice]:
    """What ``python -m tgolf.info`` reports for an op: its CUDA kernel names the calls it takes and the fallback."""
    def choose(device: torch.device) -> backend.Choice:
        choice = _unless_opt_in(device, cuda_name)
        if choice.backend != "cuda":
            return choice
        other = backend.choose(device)
        return backend.Choice("cuda", f"{choice.reason} for {condition}; other calls: {other.backend} "
                                      f"({other.reason})")
    return choose


for _name, _chooser_fn in (
        ("quantize", _chooser()), ("linear", _chooser()), ("act_quant", _chooser()),
        ("int8_mm", _chooser(_CUDA_INT8_MM, "one scale per row and a bf16 output (act_bits=8 training forward)")),
        ("int8_linear", _chooser(_CUDA_INT8, "one scale per row and bf16 x")),
        ("packed_mm", _chooser(_CUDA_PACKED, f"bf16 x with one scale per row or group_size a multiple of "
                                             f"{_CUDA_PACKED_GROUP}"))):
    backend.register_op(f"ternary.{_name}", _chooser_fn)


# -------------------------------------------------------------------------------------------------------- autograd

class _TernaryLinearFn(torch.autograd.Function):
    """y = x @ Wqᵀ + b from cached codes; STE gradients to x and the latent weight."""

    @staticmethod
    def forward(ctx, x, weight, codes, scales, bias, group_size: int, act_bits, xq=None, xs=None):
        if act_bits == 8:  # xq, xs: x's int8 codes and token scales, made by the caller (see _quantize_act)
            y = torch.ops.tgolf.ternary_int8_mm(xq, xs, codes, scales, bias, group_size, x.dtype)
            ctx.save_for_backward(xq, xs, codes, scales)
        else:
            y = torch.ops.tgolf.ternary_mm(x, codes, scales, bias, group_size)
            ctx.save_for_backward(x, codes, scales)
        ctx.group_size, ctx.act_bits, ctx.weight_dtype = group_size, act_bits, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        codes, scales = saved[-2:]
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.tgolf.ternary_mm_grad_input(grad, codes, scales, ctx.group_size)
        if ctx.needs_input_grad[1]:
            if ctx.act_bits == 8:  # gᵀ @ (x_codes · s_x) = (g · s_x)ᵀ @ x_codes; int8 codes are exact in bf16
                xq, xs = saved[0], saved[1]
                grad_w = (grad.float() * xs[:, None]).to(grad.dtype).T @ xq.to(grad.dtype)
            else:
                grad_w = grad.T @ saved[0]
            grad_w = grad_w.to(ctx.weight_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = grad.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, None, None, grad_b, None, None, None, None


def _quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's per-token int8 codes and scales for the act_bits=8 GEMM. Under torch.compile: the reference's torch ops,
    which inductor fuses into the kernel producing x (an RMSNorm, an activation), so x is read once for its amax
    and codes; the codes are the same bit for bit. Eagerly: the activation-quantization op (one kernel)."""
    if torch.compiler.is_compiling():
        return quantize_activations_int8(x)
    return torch.ops.tgolf.ternary_act_quant(x)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: the autocast dtype under autocast, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check(x: torch.Tensor, weight: torch.Tensor, group_size: int | None, act_bits: int | None) -> int:
    if weight.dim() != 2 or weight.shape[1] == 0:
        raise ValueError(f"weight must be 2-D [out_features, in_features >= 1], got shape {tuple(weight.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must equal in_features="
                         f"{weight.shape[1]}")
    check_act_bits(act_bits)
    group_count(weight.shape[1], group_size)  # validates group_size
    return 0 if group_size is None or group_size >= weight.shape[1] else group_size


def ternary_quantize(weight: torch.Tensor, group_size: int | None = None):
    """(codes int8 [N, K], scales f32 [N, G], packed uint8 [N, ⌈K/4⌉]) of a latent weight (no autograd)."""
    if weight.dim() != 2 or weight.shape[1] == 0:
        raise ValueError(f"weight must be 2-D [out_features, in_features >= 1], got shape {tuple(weight.shape)}")
    group_count(weight.shape[1], group_size)
    gs = 0 if group_size is None or group_size >= weight.shape[1] else group_size
    return torch.ops.tgolf.ternary_quantize(weight.detach(), gs)


def dense_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None, dtype: torch.dtype) -> torch.Tensor:
    """codes × scales as a dense weight in ``dtype``: what the "dense" GEMMs multiply by (cache it per update)."""
    gs = None if group_size is None or group_size >= codes.shape[1] else group_size
    return dequantize_ternary(codes, scales, gs).to(dtype)


def check_gemm(gemm: str, act_bits: int | None) -> None:
    if gemm not in TERNARY_GEMMS:
        raise ValueError(f"gemm={gemm!r}: expected one of {TERNARY_GEMMS}")
    if gemm == "dense" and act_bits is not None:
        raise ValueError(f"gemm='dense' multiplies bf16 activations: it cannot be combined with act_bits={act_bits} "
                         "(use gemm='codes', the int8 kernels)")


def ternary_linear_quantized(x: torch.Tensor, weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                             bias: torch.Tensor | None = None, group_size: int | None = None,
                             act_bits: int | None = None, gemm: str | None = None,
                             dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """``ternary_linear`` with the weight already quantized (``codes``, ``scales`` of ``weight``, e.g. cached).

    ``gemm="dense"``: cuBLAS GEMMs with ``dequantized`` (``dense_weight`` of the codes in the compute dtype; made
    here when not given or of another dtype); ``"codes"``: Triton GEMMs reading the int8 codes. None: see
    ``default_gemm``. ``act_bits=8`` always takes the int8 kernels, so it needs ``gemm="codes"``.
    """
    gemm = default_gemm(act_bits) if gemm is None else gemm
    gs = _check(x, weight, group_size, act_bits)
    check_gemm(gemm, act_bits)
    n, k = weight.shape
    if codes.shape != (n, k) or codes.dtype != torch.int8:
        raise ValueError(f"codes: expected int8 {(n, k)}, got {codes.dtype} {tuple(codes.shape)}")
    if scales.shape != (n, group_count(k, None if gs == 0 else gs)) or scales.dtype != torch.float32:
        raise ValueError(f"scales: expected float32 [{n}, G] for group_size={group_size}, got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    dtype = compute_dtype(x)
    x2 = x.reshape(-1, k).to(dtype).contiguous()
    if gemm == "dense":
        if dequantized is None or dequantized.dtype != dtype:
            dequantized = dense_weight(codes, scales, group_size, dtype)
        elif dequantized.shape != (n, k):
            raise ValueError(f"dequantized: expected shape {(n, k)}, got {tuple(dequantized.shape)}")
        y = dense_ste_matmul(x2, weight, dequantized, bias)
    else:
        xq, xs = _quantize_act(x2.detach()) if act_bits == 8 else (None, None)
        # x enters the autograd function for its gradient; with act_bits=8 its GEMM reads only xq, so under
        # torch.compile the bf16 x need not be written when its quantization fuses into its producer
        y = _TernaryLinearFn.apply(x2, weight, codes, scales, bias, gs, act_bits, xq, xs)
    return y.reshape(*x.shape[:-1], n)


def ternary_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int | None = None, act_bits: int | None = None,
                   gemm: str | None = None) -> torch.Tensor:
    """Ternary linear layer: ``x @ ternary(weight)ᵀ + bias`` with STE gradients (see reference.py for the math).

    Quantizes ``weight`` on every call; TernaryLinear caches the quantization per optimizer step instead.
    Under autocast the GEMMs run in the autocast dtype, otherwise in x's dtype. ``gemm``: see
    ``ternary_linear_quantized``.
    """
    _check(x, weight, group_size, act_bits)
    check_gemm(default_gemm(act_bits) if gemm is None else gemm, act_bits)
    codes, scales, _ = ternary_quantize(weight, group_size)
    return ternary_linear_quantized(x, weight, codes, scales, bias, group_size, act_bits, gemm)


def default_gemm(act_bits: int | None) -> str:
    """"dense" for bf16 activations: on an H100 (profiles/2026-11-27-NVIDIA-H100-80GB-HBM3, M = 65,536) the
    Triton GEMMs reading the codes ran forward+backward 1.5–2.7× slower than even the eager reference, which
    quantizes on every call and then runs cuBLAS; "dense" is that cuBLAS work without the per-call quantization.
    "codes" (the int8 tensor-core kernels) with ``act_bits=8``."""
    return "codes" if act_bits is not None else "dense"


def _inference_args(x: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int | None) -> int:
    if not x.dtype.is_floating_point or x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected a floating-point tensor [..., {in_features}], got {x.dtype} "
                         f"{tuple(x.shape)}")
    groups = group_count(in_features, group_size)
    gs = 0 if group_size is None or group_size >= in_features else group_size
    if scales.dim() != 2 or scales.shape[1] != (1 if gs == 0 else groups) or scales.dtype != torch.float32:
        raise ValueError(f"scales: expected float32 [N, {1 if gs == 0 else groups}], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    return gs


def _direct_call(*tensors: torch.Tensor | None) -> bool:
    """Whether an inference function may run its op's implementation without the torch.library layer: plain
    tensors, no autograd, nothing tracing. Decoding calls these ops with a few tokens, where host time is the
    cost; the layer is needed only by torch.compile and export, and (with no autograd formula) to refuse a
    backward."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (grad and t.requires_grad)) for t in tensors)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                  group_size: int | None = None) -> torch.Tensor:
    """``x @ Wqᵀ`` from 2-bit packed weights (inference, no autograd); meant for few tokens (decoding)."""
    gs = _inference_args(x, scales, in_features, group_size)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape != (scales.shape[0],
                                                                            packed_length(in_features)):
        kind = "truncated" if packed.dim() == 2 and packed.shape[1] < packed_length(in_features) else "malformed"
        raise ValueError(f"{kind} packed weight: expected uint8 [{scales.shape[0]}, {packed_length(in_features)}] "
                         f"for in_features={in_features}, got {packed.dtype} {tuple(packed.shape)}")
    x2 = x.reshape(-1, in_features).to(compute_dtype(x)).contiguous()
    op = _packed_mm_any if _direct_call(x2) else torch.ops.tgolf.ternary_packed_mm
    y = op(x2, packed.contiguous(), scales.contiguous(), in_features, gs)
    return y.reshape(*x.shape[:-1], packed.shape[0])


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                group_size: int | None = None) -> torch.Tensor:
    """Inference form of the ``act_bits=8`` layer (no autograd): per-token int8 activations × ternary codes."""
    gs = _inference_args(x, scales, codes.shape[1], group_size)
    x2 = x.reshape(-1, codes.shape[1]).to(compute_dtype(x)).contiguous()
    op = _int8_linear_any if _direct_call(x2, bias) else torch.ops.tgolf.ternary_int8_linear
    y = op(x2, codes.contiguous(), scales.contiguous(), bias, gs)
    return y.reshape(*x.shape[:-1], codes.shape[0])
