"""Plain-PyTorch definition of ternary (BitNet b1.58) linear layers: the truth every kernel is tested against.

Weights: ``scale = mean |w|`` over each row (or each group of ``group_size`` input columns, the last group may be
shorter), summed in float64 and rounded float64 → float32 → float16 so that every scale is exactly an fp16 value
(artifacts store fp16 scales losslessly); ``code = +1 if w > scale/2, -1 if w < -scale/2, else 0``. That is
``clamp(round(w / scale), -1, 1)`` (Ma et al. 2024, "The Era of 1-bit LLMs") decided on the exact quotient, so a
kernel reproduces it bit for bit without a division.

Activations (``act_bits=8``): per-token absmax, ``inv = float32(127 / absmax)``, ``code = round_half_even(x × inv)``
on the exact float64 product, ``scale = float32(absmax / 127)``; again chosen so that kernels match exactly.

The forward is fake-quantized; gradients pass straight through both quantizers (STE): the latent weight gets the
gradient of the dequantized weight, ``x`` the gradient of its dequantized copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tgolf.ops.quant.reference import FP16_TINY, _grouped, dequantize_weight

FP16_MAX = 65504.0
ACT_TINY = 2.0 ** -64  # absmax floor: an all-zero token gets codes 0 instead of 0/0
ACT_QMAX = 127


def group_count(in_features: int, group_size: int | None) -> int:
    """Number of scales per row: 1 per row, or ceil(in_features / group_size)."""
    if group_size is None:
        return 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r}: must be a positive integer or None")
    return -(-in_features // group_size)


def ternary_scales(w: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Absmean scales float32 [N, G], each exactly representable in fp16."""
    k = w.shape[1]
    g = k if group_size is None else group_size
    groups = group_count(k, group_size)
    sums = _grouped(w.detach().double(), group_size).abs().sum(dim=-1)  # zero padding adds nothing
    counts = torch.full((groups,), float(g), dtype=torch.float64, device=w.device)
    counts[-1] = k - (groups - 1) * g
    mean = (sums / counts).float().clamp(FP16_TINY, FP16_MAX)
    return mean.half().float()


def ternary_codes(w: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Codes int8 [N, K] in {-1, 0, 1} for the given scales."""
    k = w.shape[1]
    half = (0.5 * scales).repeat_interleave(k if group_size is None else group_size, dim=1)[:, :k]
    w = w.detach().float()
    return ((w > half).to(torch.int8) - (w < -half).to(torch.int8)).contiguous()


def quantize_ternary(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` int8 [N, K] in {-1, 0, 1} and absmean ``scales`` float32 [N, G] (G = 1 per row)."""
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"weight must be 2-D [out_features, in_features >= 1], got shape {tuple(w.shape)}")
    scales = ternary_scales(w, group_size)
    return ternary_codes(w, scales, group_size), scales


def dequantize_ternary(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """float32 [N, K] = codes × their row's (or group's) scale."""
    return dequantize_weight(codes, scales, group_size)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: ``codes`` int8 like ``x`` in [-127, 127], ``scales`` float32 ``x.shape[:-1]``."""
    amax = x.detach().abs().amax(dim=-1).double().clamp_min(ACT_TINY)
    inv = (ACT_QMAX / amax).float().double()
    codes = torch.round(x.detach().double() * inv[..., None]).clamp_(-ACT_QMAX, ACT_QMAX).to(torch.int8)
    return codes, (amax / ACT_QMAX).float()


class _StraightThrough(torch.autograd.Function):
    """Forward the quantized tensor, pass the gradient unchanged to the latent one."""

    @staticmethod
    def forward(latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.latent_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.latent_dtype), None


def straight_through(latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward, identity gradient to ``latent`` (exact, unlike ``w + (q - w).detach()``)."""
    return _StraightThrough.apply(latent, quantized.to(latent.dtype))


def check_act_bits(act_bits: int | None) -> int | None:
    if act_bits not in (None, 8):
        raise ValueError(f"act_bits={act_bits!r}: expected None (bf16/fp32 activations) or 8")
    return act_bits


def ternary_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                             group_size: int | None = None, act_bits: int | None = None) -> torch.Tensor:
    """Fake-quantized ternary linear layer with straight-through gradients (honours autocast via F.linear)."""
    check_act_bits(act_bits)
    codes, scales = quantize_ternary(weight, group_size)
    w = straight_through(weight, dequantize_ternary(codes, scales, group_size))
    if act_bits == 8:
        xc, xs = quantize_activations_int8(x)
        x = straight_through(x, xc.float() * xs[..., None])
    return F.linear(x, w, bias)
