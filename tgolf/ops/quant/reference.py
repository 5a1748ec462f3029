"""Plain-PyTorch definition of symmetric integer weight quantization (QAT in training, and export).

One quantizer for both: the module trains on ``dequantize_weight(*quantize_weight(w, ...))`` and the exporter
stores the same codes and scales, so the scored model is the trained one. Scales are float32 values that
are exactly representable in float16, so artifacts store them as fp16 without changing a single output.
"""
from __future__ import annotations

import math

import torch

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): a zero row keeps a usable scale


def qmax_for_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: expected an integer from 2 to 8")
    return (1 << (bits - 1)) - 1


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[N, K] → [N, G, g] (last group zero-padded) so that per-group statistics are per-row ones."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = k if group_size is None else int(group_size)
    if g <= 0:
        raise ValueError(f"group_size={group_size!r}: must be a positive integer or None")
    groups = math.ceil(k / g)
    if groups * g != k:
        w = torch.nn.functional.pad(w, (0, groups * g - k))
    return w.reshape(n, groups, g)


def row_clip(w: torch.Tensor, group_size: int | None = None, clip_quantile: float | None = None,
             clip_sigmas: float | None = None) -> torch.Tensor:
    """Clip value per row (or group) [N, G]: absmax, a quantile of |w|, or a multiple of the std."""
    if clip_quantile is not None and clip_sigmas is not None:
        raise ValueError("give at most one of clip_quantile and clip_sigmas")
    wg = _grouped(w.float(), group_size).abs()
    if clip_quantile is not None:
        if not 0.0 < clip_quantile <= 1.0:
            raise ValueError(f"clip_quantile={clip_quantile}: must be in (0, 1]")
        return torch.quantile(wg, clip_quantile, dim=-1)
    if clip_sigmas is not None:
        if clip_sigmas <= 0:
            raise ValueError(f"clip_sigmas={clip_sigmas}: must be > 0")
        rms = wg.square().mean(dim=-1).sqrt()
        return torch.minimum(clip_sigmas * rms, wg.amax(dim=-1))
    return wg.amax(dim=-1)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None, clip_quantile: float | None = None,
                    clip_sigmas: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: ``codes`` int8 [N, K] in [-qmax, qmax], ``scales`` float32 [N, G] (G = 1 per row)."""
    qmax = qmax_for_bits(bits)
    clip = row_clip(w, group_size, clip_quantile, clip_sigmas)
    scales = (clip / qmax).clamp_min(FP16_TINY).to(torch.float16).float()
    n, k = w.shape
    wg = _grouped(w.float(), group_size)
    codes = torch.round(wg / scales[..., None]).clamp_(-qmax, qmax).to(torch.int8)
    return codes.reshape(n, -1)[:, :k].contiguous(), scales


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """float32 [N, K] = codes × the scale of each code's row (or group)."""
    n, k = codes.shape
    g = k if group_size is None else int(group_size)
    per_column = scales.float().repeat_interleave(g, dim=1)[:, :k]
    return codes.float() * per_column


# ---------------------------------------------------------------------------------------------------------
# Quantization-aware training: fake quantization with a straight-through estimator (STE).
#
# The forward sees dequantize_weight(*quantize_weight(w)); the backward treats the quantizer as the identity
# for EVERY entry, clipped ones included (the standard STE: a clipped weight keeps receiving gradient, so it
# can move back inside the clip range; the scales are not differentiated).
# ---------------------------------------------------------------------------------------------------------

def straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Equal to ``value`` bit for bit in the forward, gradient of the identity to ``source`` in the backward.

    ``value + (source - source.detach())`` adds an exact zero, unlike the common
    ``source + (value - source).detach()``, which can round when ``source`` was clipped far from ``value``.
    """
    return value.detach() + (source - source.detach())


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None,
                         clip_quantile: float | None = None, clip_sigmas: float | None = None) -> torch.Tensor:
    """float32 dequant(quant(w)) with the STE gradient to ``w``."""
    codes, scales = quantize_weight(w.detach(), bits, group_size, clip_quantile, clip_sigmas)
    return straight_through(dequantize_weight(codes, scales, group_size), w.float())


def qat_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 6,
                         group_size: int | None = None, clip_sigmas: float | None = None,
                         clip_quantile: float | None = None) -> torch.Tensor:
    """``x @ dequant(quant(weight)).T + bias`` in x's dtype (the dequantized weight is cast to it), STE backward."""
    w = fake_quantize_weight(weight, bits, group_size, clip_quantile, clip_sigmas).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------
# FP8 (e4m3 forward, e5m2 gradients) with power-of-two scales.
#
# A tensor (or each row) is multiplied by 2^-k, the smallest power of two that brings its absolute maximum
# within the format's largest finite value, then rounded to nearest-even. Power-of-two scales make scaling
# exact in both directions: only the fp8 rounding changes a value, a dequantized fp8 value is exact in bf16,
# and the Triton, torch._scaled_mm and reference paths agree bit for bit on the quantized operands. The cost
# against an exact amax/fmt_max scale is at most one binade of headroom at the top of the range.
# ---------------------------------------------------------------------------------------------------------

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_SCALINGS = ("tensor", "row")
AMAX_RANGE = (2.0 ** -60, 2.0 ** 60)  # keeps 2^k and 2^-k normal fp32 numbers (zero rows included)


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dequantization scale 2^k (float32), smallest with ``amax <= finfo(dtype).max * 2^k``."""
    mantissa, exponent = torch.frexp(amax.float().clamp(*AMAX_RANGE))
    fmt_mantissa, fmt_exponent = torch.frexp(torch.tensor(torch.finfo(dtype).max))
    k = exponent - fmt_exponent + (mantissa > fmt_mantissa).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(mantissa), k)


def check_fp8_scaling(scaling: str) -> None:
    if scaling not in FP8_SCALINGS:
        raise ValueError(f"scaling={scaling!r}: expected one of {FP8_SCALINGS}")


def quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", scaling: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """2-D ``x`` → (fp8 codes [M, K], float32 scales: [] per tensor or [M, 1] per row); x ≈ codes * scales."""
    check_fp8_scaling(scaling)
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8 expects a 2-D tensor, got shape {tuple(x.shape)}")
    dtype = FP8_FORMATS[fmt]
    xf = x.float()
    amax = xf.abs().amax() if scaling == "tensor" else xf.abs().amax(dim=1, keepdim=True)
    scale = fp8_scale(amax, dtype)
    return (xf * scale.reciprocal()).to(dtype), scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale


class _Fp8LinearReference(torch.autograd.Function):
    """Forward and STE backward of fp8_linear_reference, with the optional fp8 input-gradient GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias, scaling, fp8_backward):
        xq, sx = quantize_fp8(x, "e4m3", scaling)
        wq, sw = quantize_fp8(weight, "e4m3", scaling)
        x_fq, w_fq = dequantize_fp8(xq, sx), dequantize_fp8(wq, sw)
        out = x_fq @ w_fq.T
        if bias is not None:
            out = out + bias.float()
        ctx.save_for_backward(x_fq, wq, sw)
        ctx.fp8_backward, ctx.has_bias = fp8_backward, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_fq, wq, sw = ctx.saved_tensors
        g = grad.float()
        if ctx.fp8_backward:
            # fold the weight's scale (per output row = per column of g) into g, then one e5m2 scale for all of g
            gq, sg = quantize_fp8(g * sw.reshape(1, -1), "e5m2", "tensor")
            grad_x = (gq.float() @ wq.float()) * sg
        else:
            grad_x = g @ dequantize_fp8(wq, sw)
        grad_w = g.T @ x_fq
        grad_b = g.sum(0).to(ctx.dtypes[2]) if ctx.has_bias else None
        return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), grad_b, None, None


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         scaling: str = "tensor", fp8_backward: bool = False) -> torch.Tensor:
    """e4m3 ``x`` (per tensor or per row = token) @ e4m3 ``weight`` (per tensor or per output row).T + bias.

    Computed in float32 from the rounded fp8 values, returned in x's dtype. Backward (STE through both
    quantizers): grad_x = g @ w_fq, grad_w = g.T @ x_fq; with ``fp8_backward`` the input gradient instead uses
    e5m2(g * w_scale, one scale per tensor) @ w_codes, the GEMM the fp8 backward path runs.
    """
    check_fp8_scaling(scaling)
    lead = x.shape[:-1]
    out = _Fp8LinearReference.apply(x.reshape(-1, x.shape[-1]), weight, bias, scaling, fp8_backward)
    return out.reshape(*lead, weight.shape[0])
