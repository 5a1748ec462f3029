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
