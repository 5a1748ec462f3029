"""Quantized linear ops: ``qat_linear`` (int4–8 fake-quantized weights, STE) and ``fp8_linear`` (e4m3).

Both are compositions of ``torch.ops.tgolf`` custom ops with fake implementations, so torch.compile(fullgraph)
traces them:

    qat_linear, gemm="fused" = qat_quantize (weight → int8 codes + scales, once per call) → qat_matmul (autograd:
                                Triton GEMMs dequantizing the codes in registers, forward and input gradient)
    qat_linear, gemm="dense" = qat_fake_quantize (weight → dequantized copy in x's dtype) → qat_dense_matmul (cuBLAS)
    fp8_linear = fp8_quantize (x and weight → e4m3 codes + power-of-two scales; under torch.compile the same
                 math in torch ops, which inductor fuses into x's producer) → fp8_matmul (STE autograd around it)

The weight gradient is always grad.T @ x (straight-through estimator: every entry, clipped ones included, gets
the gradient of the identity), a plain GEMM with no quantized operand, left to cuBLAS (torch.matmul).

Why codes are materialised once per call instead of re-quantized inside every GEMM tile: the GEMM re-reads each
weight tile once per row tile of x (M / BLOCK_M times, 512 at M = 65,536), so quantizing inside the tile would
redo a correctly rounded division, a rounding and a clamp per weight element that many times, on the CUDA cores
beside the tensor cores. One pass over the weight (read fp32, write one int8 byte per element) costs about
N·K·5 bytes, against the GEMM's 2·M·N·K FLOPs; the GEMM then only converts int8 → bf16 and multiplies by the
scale in registers, and the backward reuses the saved codes (no second quantization). The ops cache nothing across
calls; QATLinear keeps its "dense" weight operand per weight update (tgolf.nn.weight_cache), outside torch.compile.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from tgolf.backend import Choice, choose, register_op
from tgolf.ops.quant import reference as ref

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------------------
# Argument checks (clear errors naming the argument)
# ------------------------------------------------------------------------------------------------------------

def check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 4 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: expected an integer from 4 to 8")


def check_group_size(group_size) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0):
        raise ValueError(f"group_size={group_size!r}: expected a positive integer (columns per scale) or None "
                         "(one scale per row)")


def check_clip(clip_sigmas, clip_quantile) -> None:
    if clip_sigmas is not None and clip_quantile is not None:
        raise ValueError("give at most one of clip_sigmas and clip_quantile")
    if clip_sigmas is not None and not clip_sigmas > 0:
        raise ValueError(f"clip_sigmas={clip_sigmas!r}: must be > 0")
    if clip_quantile is not None and not 0.0 < clip_quantile <= 1.0:
        raise ValueError(f"clip_quantile={clip_quantile!r}: must be in (0, 1]")


def check_linear_shapes(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match weight of shape {tuple(weight.shape)}: "
                         f"x's last dimension must be in_features = {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match weight of shape "
                         f"{tuple(weight.shape)}: expected ({weight.shape[0]},)")


def _kernels():
    from tgolf.kernels import quant  # imported on first use: triton is optional on CPU-only installs

    return quant


# ------------------------------------------------------------------------------------------------------------
# QAT
# ------------------------------------------------------------------------------------------------------------

def qat_choice(device: torch.device) -> Choice:
    return choose(device, has_triton=True)


def _quantize_codes(weight, bits, group_size, clip_sigmas, clip_quantile, dequant_dtype):
    clip = None
    if clip_sigmas is not None or clip_quantile is not None:  # the reference's clip, so scales match exactly
        clip = ref.row_clip(weight, group_size, clip_quantile, clip_sigmas).contiguous()
    return _kernels().quantize_codes(weight, ref.qmax_for_bits(bits), group_size or weight.shape[1], clip,
                                     dequant_dtype)


@torch.library.custom_op("tgolf::qat_quantize", mutates_args=())
def qat_quantize(weight: Tensor, bits: int, group_size: Optional[int] = None, clip_sigmas: Optional[float] = None,
                 clip_quantile: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """(int8 codes [N, K], float32 scales [N, G]) equal to ``reference.quantize_weight`` bit for bit."""
    if qat_choice(weight.device).backend != "triton":
        return ref.quantize_weight(weight, bits, group_size, clip_quantile, clip_sigmas)
    codes, scales, _ = _quantize_codes(weight, bits, group_size, clip_sigmas, clip_quantile, None)
    return codes, scales


@qat_quantize.register_fake
def _(weight, bits, group_size=None, clip_sigmas=None, clip_quantile=None):
    n, k = weight.shape
    groups = 1 if group_size is None else math.ceil(k / group_size)
    return weight.new_empty((n, k), dtype=torch.int8), weight.new_empty((n, groups), dtype=torch.float32)


def _qat_matmul_impl(a: Tensor, codes: Tensor, scales: Tensor, group_size: Optional[int], bias: Optional[Tensor],
                     weight_rows_are_n: bool) -> Tensor:
    if qat_choice(a.device).backend == "triton":
        return _kernels().qat_matmul(a, codes, scales, group_size or codes.shape[1], bias, weight_rows_are_n)
    w = ref.dequantize_weight(codes, scales, group_size).to(a.dtype)
    if weight_rows_are_n:
        return F.linear(a, w, None if bias is None else bias.to(a.dtype))
    return a @ w


@torch.library.custom_op("tgolf::qat_matmul", mutates_args=())
def qat_matmul(x: Tensor, weight: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor],
               group_size: Optional[int]) -> Tensor:
    """x [M, K] @ dequant(codes, scales).T + bias, in x's dtype; ``weight`` only receives the STE gradient."""
    return _qat_matmul_impl(x, codes, scales, group_size, bias, weight_rows_are_n=True)


@qat_matmul.register_fake
def _(x, weight, codes, scales, bias, group_size):
    return x.new_empty((x.shape[0], codes.shape[0]))


@torch.library.custom_op("tgolf::qat_matmul_grad_input", mutates_args=())
def qat_matmul_grad_input(grad: Tensor, codes: Tensor, scales: Tensor, group_size: Optional[int]) -> Tensor:
    """grad [M, N] @ dequant(codes, scales) [N, K], in grad's dtype (the same quantized weight as the forward)."""
    return _qat_matmul_impl(grad, codes, scales, group_size, None, weight_rows_are_n=False)


@qat_matmul_grad_input.register_fake
def _(grad, codes, scales, group_size):
    return grad.new_empty((grad.shape[0], codes.shape[1]))


def _qat_setup(ctx, inputs, output):
    x, weight, codes, scales, bias, group_size = inputs
    ctx.save_for_backward(x, codes, scales)
    ctx.group_size = group_size
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _qat_backward(ctx, grad):
    x, codes, scales = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.tgolf.qat_matmul_grad_input(grad, codes, scales, ctx.group_size)
    if ctx.needs_input_grad[1]:
        # straight-through: d(dequant(quant(w)))/dw = identity. A plain GEMM with no quantized operand, so cuBLAS
        # (torch.matmul), the fastest GEMM available, computes it, as nn.Linear's backward does.
        grad_w = (grad.T @ x.to(grad.dtype)).to(ctx.weight_dtype)
    if ctx.needs_input_grad[4]:
        grad_b = grad.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, None, None, grad_b, None


qat_matmul.register_autograd(_qat_backward, setup_context=_qat_setup)


# The "dense" variant: the quantizer also writes the dequantized weight in x's dtype, and cuBLAS does the GEMMs.
# Under autocast nn.Linear itself writes a bf16 copy of its fp32 weight every forward (autocast's cast), so this
# costs what nn.Linear costs plus the absmax pass; the fused Triton GEMM avoids the copy but must match cuBLAS's
# GEMM efficiency to come out ahead. Which wins at contest shapes is for the GPU benchmark to say.

@torch.library.custom_op("tgolf::qat_fake_quantize", mutates_args=())
def qat_fake_quantize(weight: Tensor, bits: int, group_size: Optional[int], clip_sigmas: Optional[float],
                      clip_quantile: Optional[float], dtype: torch.dtype) -> Tensor:
    """dequant(quant(weight)) in ``dtype`` (the cast of the exact fp32 product), one pass over the weight."""
    if qat_choice(weight.device).backend != "triton":
        codes, scales = ref.quantize_weight(weight, bits, group_size, clip_quantile, clip_sigmas)
        return ref.dequantize_weight(codes, scales, group_size).to(dtype)
    return _quantize_codes(weight, bits, group_size, clip_sigmas, clip_quantile, dtype)[2]


@qat_fake_quantize.register_fake
def _(weight, bits, group_size, clip_sigmas, clip_quantile, dtype):
    return weight.new_empty(weight.shape, dtype=dtype)


@torch.library.custom_op("tgolf::qat_dense_matmul", mutates_args=())
def qat_dense_matmul(x: Tensor, weight: Tensor, dequantized: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ dequantized.T + bias (cuBLAS); ``weight`` only receives the STE gradient."""
    return F.linear(x, dequantized, None if bias is None else bias.to(x.dtype))


@qat_dense_matmul.register_fake
def _(x, weight, dequantized, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _dense_setup(ctx, inputs, output):
    x, weight, dequantized, bias = inputs
    ctx.save_for_backward(x, dequantized)
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dense_backward(ctx, grad):
    x, dequantized = ctx.saved_tensors
    grad_x = grad @ dequantized if ctx.needs_input_grad[0] else None
    grad_w = (grad.T @ x).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    grad_b = grad.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return grad_x, grad_w, None, grad_b


qat_dense_matmul.register_autograd(_dense_backward, setup_context=_dense_setup)

QAT_GEMMS = ("fused", "dense")


def qat_dense_weight(weight: Tensor, bits: int, group_size: int | None, clip_sigmas: float | None,
                     clip_quantile: float | None, dtype: torch.dtype) -> Tensor:
    """dequant(quant(weight)) in ``dtype``, detached: the weight operand of ``gemm="dense"`` (QATLinear keeps it for
    all the micro-batches of one weight update)."""
    return torch.ops.tgolf.qat_fake_quantize(weight.detach(), bits, group_size, clip_sigmas, clip_quantile, dtype)


def qat_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, bits: int = 6, group_size: int | None = None,
               clip_sigmas: float | None = None, clip_quantile: float | None = None, gemm: str = "dense",
               dequantized: Tensor | None = None) -> Tensor:
    """``x @ dequant(quant(weight)).T + bias`` in x's dtype, with the straight-through gradient to ``weight``.

    Symmetric ``bits``-bit codes (4–8) with one scale per row (``group_size=None``) or per ``group_size``
    columns, clipped at the absmax (default), ``clip_sigmas`` × the RMS, or the ``clip_quantile`` of |w|
    (sorts: slow in training). Same codes as ``reference.quantize_weight`` (the exporter's quantizer).
    ``gemm``: "dense" (a dequantized copy in x's dtype per call, then cuBLAS) or "fused" (int8 codes dequantized
    inside the Triton GEMMs, no bf16 copy of the weight); both compute the same values. "dense" is the default
    because it was measured faster: on an H100 (profiles/2026-11-27-NVIDIA-H100-80GB-HBM3, M = 65,536, int6)
    forward+backward 1.07 vs 1.26 ms at K512 N1024, 0.81 vs 0.92 at K1024 N512, 1.42 vs 2.17 at K768 N3072.
    ``dequantized``: with "dense", ``qat_dense_weight(weight, ...)`` made earlier for this same weight (a cache).
    """
    check_bits(bits)
    check_group_size(group_size)
    check_clip(clip_sigmas, clip_quantile)
    check_linear_shapes(x, weight, bias)
    if gemm not in QAT_GEMMS:
        raise ValueError(f"gemm={gemm!r}: expected one of {QAT_GEMMS}")
    x2 = x.reshape(-1, weight.shape[1])
    if gemm == "dense":
        if dequantized is None:
            dequantized = qat_dense_weight(weight, bits, group_size, clip_sigmas, clip_quantile, x.dtype)
        elif dequantized.shape != weight.shape or dequantized.dtype != x.dtype:
            raise ValueError(f"dequantized: expected {x.dtype} {tuple(weight.shape)} (the weight's shape in x's "
                             f"dtype), got {dequantized.dtype} {tuple(dequantized.shape)}")
        out = torch.ops.tgolf.qat_dense_matmul(x2, weight, dequantized, bias)
    else:
        codes, scales = torch.ops.tgolf.qat_quantize(weight.detach(), bits, group_size, clip_sigmas, clip_quantile)
        out = torch.ops.tgolf.qat_matmul(x2, weight, codes, scales, bias, group_size)
    return out.reshape(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------------------------
# FP8
# ------------------------------------------------------------------------------------------------------------

def fp8_supported(device: torch.device) -> bool:
    """fp8 tensor cores: sm_89 (Ada) and newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _use_scaled_mm(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def fp8_choice(device: torch.device) -> Choice:
    base = choose(device, has_triton=True)
    if device.type == "cuda" and base.backend == "triton":
        if not fp8_supported(device):
            return Choice("reference", "no fp8 tensor cores before sm_89: fp8 simulated in fp32 (FP8Linear uses bf16)")
        if _use_scaled_mm(device):
            return Choice("triton", "Triton fp8 quantization + torch._scaled_mm (cuBLASLt) GEMM on sm_90+")
    return base


@torch.library.custom_op("tgolf::fp8_quantize", mutates_args=())
def fp8_quantize(x: Tensor, fmt: str, scaling: str) -> tuple[Tensor, Tensor]:
    """2-D x → (fp8 codes, float32 power-of-two scales [] or [M, 1]), as ``reference.quantize_fp8``."""
    if fp8_choice(x.device).backend == "triton":
        return _kernels().fp8_quantize(x, ref.FP8_FORMATS[fmt], scaling == "row")
    return ref.quantize_fp8(x, fmt, scaling)


@fp8_quantize.register_fake
def _(x, fmt, scaling):
    shape = (x.shape[0], 1) if scaling == "row" else ()
    return x.new_empty(x.shape, dtype=ref.FP8_FORMATS[fmt]), x.new_empty(shape, dtype=torch.float32)


def _scaled_mm(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, out_dtype: torch.dtype,
               bias: Optional[Tensor] = None) -> Tensor:
    """``(a @ b) * sa * sb + bias``: a fp8 [M, K], sa [] or [M, 1]; b fp8 [K, N], sb [] or N scales."""
    backend = fp8_choice(a.device).backend
    if backend == "reference":
        out = (a.float() @ b.float()) * sa * sb.reshape(1, -1)
        return (out if bias is None else out + bias.float()).to(out_dtype)
    m, k = a.shape
    n = b.shape[1]
    rowwise = sa.dim() > 0
    if (_use_scaled_mm(a.device) and k % 16 == 0 and n % 16 == 0
            and (not rowwise or (out_dtype == torch.bfloat16 and a.dtype == b.dtype == torch.float8_e4m3fn))):
        b_col_major = b if b.stride(0) == 1 else b.T.contiguous().T
        sb_mm = sb.reshape(1, n) if rowwise else sb
        out = torch._scaled_mm(a, b_col_major, scale_a=sa, scale_b=sb_mm, out_dtype=out_dtype)
        return out if bias is None else out + bias.to(out_dtype)
    return _kernels().fp8_matmul(a, sa, b, sb, out_dtype, bias)


@torch.library.custom_op("tgolf::fp8_matmul", mutates_args=())
def fp8_matmul(xq: Tensor, sx: Tensor, wq: Tensor, sw: Tensor, bias: Optional[Tensor],
               out_dtype: torch.dtype) -> Tensor:
    """(xq·sx) @ (wq·sw).T + bias in ``out_dtype``, from the fp8 codes alone (no autograd: see _Fp8LinearFn)."""
    return _scaled_mm(xq, sx, wq.T, sw, out_dtype, bias)


@fp8_matmul.register_fake
def _(xq, sx, wq, sw, bias, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


@torch.library.custom_op("tgolf::fp8_matmul_grad_input", mutates_args=())
def fp8_matmul_grad_input(grad: Tensor, wq: Tensor, sw: Tensor) -> Tensor:
    """e5m2(grad · w_scale, one scale) @ wq in fp8: the input gradient of fp8_backward (reference's definition)."""
    gq, sg = torch.ops.tgolf.fp8_quantize(grad * sw.reshape(1, -1).to(grad.dtype), "e5m2", "tensor")
    return _scaled_mm(gq, sg, wq, torch.ones((), device=wq.device), grad.dtype)


@fp8_matmul_grad_input.register_fake
def _(grad, wq, sw):
    return grad.new_empty((grad.shape[0], wq.shape[1]))


class _Fp8LinearFn(torch.autograd.Function):
    """The straight-through autograd of fp8_linear around the fp8 GEMM.

    ``x`` and ``weight`` enter only to receive their gradients; the GEMM reads their codes. Under torch.compile
    that lets inductor leave the bf16 ``x`` unwritten when its quantization fuses into the kernel producing it
    (an op taking ``x`` itself as an input would force that write). The backward saves only fp8 codes and scales:
    half the bytes of a saved bf16 x.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], xq: Tensor, sx: Tensor, wq: Tensor,
                sw: Tensor, fp8_backward: bool) -> Tensor:
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.fp8_backward, ctx.weight_dtype = fp8_backward, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.ops.tgolf.fp8_matmul(xq, sx, wq, sw, bias, x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        xq, sx, wq, sw = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if ctx.fp8_backward:
                grad_x = torch.ops.tgolf.fp8_matmul_grad_input(grad, wq, sw)
            else:  # power-of-two scales: the dequantized e4m3 weight is exact in bf16
                grad_x = grad @ (wq.to(grad.dtype) * sw.to(grad.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = (grad.T @ (xq.to(grad.dtype) * sx.to(grad.dtype))).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


# The largest finite value of each fp8 format is 1.75 · 2^MAX_EXP.
_FP8_MAX_EXP = {fmt: int(math.log2(torch.finfo(dtype).max / 1.75)) for fmt, dtype in ref.FP8_FORMATS.items()}


def fp8_quantize_fusible(x: Tensor, fmt: str, scaling: str) -> tuple[Tensor, Tensor]:
    """``reference.quantize_fp8`` (the same codes and scales, bit for bit) in integer operations on the fp32 bits.

    Written for inductor: under torch.compile this becomes part of the kernel that produces ``x`` (an RMSNorm, an
    activation); with per-row scales the activation is then read once, its amax taken in the same pass (a
    tensor-wide amax still needs a reduction over all of x first). Integer operations lower to plain integer
    instructions, so the scales cannot depend on how a backend implements frexp, ldexp or exp2. The custom op
    ``fp8_quantize`` is opaque to the compiler and runs as a kernel of its own after ``x`` was written.
    """
    dtype = ref.FP8_FORMATS[fmt]
    xf = x.float()
    amax = xf.abs().amax() if scaling == "tensor" else xf.abs().amax(dim=1, keepdim=True)
    bits = amax.clamp(*ref.AMAX_RANGE).view(torch.int32)
    # scale 2^k, the smallest with amax ≤ 1.75 · 2^(MAX_EXP + k): from amax's exponent, one more above mantissa 1.75
    k = (bits >> 23) - 127 - _FP8_MAX_EXP[fmt] + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    return (xf * ((127 - k) << 23).view(torch.float32)).to(dtype), ((k + 127) << 23).view(torch.float32)


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scaling: str = "tensor",
               fp8_backward: bool = False) -> Tensor:
    """``e4m3(x) @ e4m3(weight).T + bias`` in x's dtype (``reference.fp8_linear_reference``), STE backward.

    ``scaling``: "tensor" (one power-of-two scale each for x and weight) or "row" (per token of x, per output
    row of weight). ``fp8_backward``: the input-gradient GEMM in fp8 too (e5m2 gradient × e4m3 weight).
    """
    ref.check_fp8_scaling(scaling)
    if not isinstance(fp8_backward, bool):
        raise ValueError(f"fp8_backward={fp8_backward!r}: expected a bool")
    check_linear_shapes(x, weight, bias)
    x2 = x.reshape(-1, weight.shape[1])
    # compiled: quantization left to inductor, to fuse with x's producer; eager: one Triton kernel per operand
    quantize = fp8_quantize_fusible if torch.compiler.is_compiling() else torch.ops.tgolf.fp8_quantize
    xq, sx = quantize(x2.detach(), "e4m3", scaling)
    wq, sw = quantize(weight.detach(), "e4m3", scaling)
    out = _Fp8LinearFn.apply(x2, weight, bias, xq, sx, wq, sw, fp8_backward)
    return out.reshape(*x.shape[:-1], weight.shape[0])


register_op("quant.qat_linear", qat_choice)
register_op("quant.fp8_linear", fp8_choice)

__all__ = ["qat_linear", "qat_dense_weight", "fp8_linear", "qat_quantize", "qat_fake_quantize", "fp8_quantize",
           "fp8_quantize_fusible", "QAT_GEMMS", "fp8_supported", "check_bits", "check_group_size", "check_clip",
           "check_linear_shapes"]
