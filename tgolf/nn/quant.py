"""Drop-in quantized ``nn.Linear`` layers: QATLinear (int4–8 weights, STE) and FP8Linear (e4m3).

Both keep an ordinary latent ``weight`` (and ``bias``) parameter, so state dicts, initialisation and optimizer
grouping are those of ``nn.Linear``. The tgolf custom ops are not autocast-aware, so under ``torch.autocast``
the input is cast to the autocast dtype here, as autocast does for ``F.linear``; the output has that dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tgolf.nn.weight_cache import PerUpdateCache
from tgolf.ops.quant import (QAT_GEMMS, check_bits, check_clip, check_group_size, fp8_linear, fp8_supported,
                             qat_dense_weight, qat_linear)
from tgolf.ops.quant.reference import check_fp8_scaling, quantize_weight


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class QATLinear(PerUpdateCache, nn.Linear):
    """``nn.Linear`` whose forward uses the ``bits``-bit symmetric quantization of its weight (STE backward).

    One scale per output row (``group_size=None``) or per ``group_size`` input columns. Clip: the absmax by
    default (no clipping): it needs no hyperparameter and no sort, fuses into the code kernel as a max, and QAT
    lets the weights adapt to the grid; ``clip_sigmas`` (× RMS of the row or group) is the cheap alternative,
    ``clip_quantile`` sorts every row (torch.quantile) each step and is meant for experiments only.
    ``gemm``: "dense" (dequantized copy + cuBLAS, the default: measured faster on an H100) or "fused" (Triton GEMMs
    reading int8 codes), same values; see ``tgolf.ops.qat_linear``. The "dense" weight operand is made once per
    weight update (tgolf.nn.weight_cache), not once per micro-batch.
    """

    CACHE_SLOTS = ("_dense",)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int = 6,
                 group_size: int | None = None, clip_sigmas: float | None = None,
                 clip_quantile: float | None = None, gemm: str = "dense", device=None, dtype=None):
        check_bits(bits)
        check_group_size(group_size)
        check_clip(clip_sigmas, clip_quantile)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits, self.group_size = bits, group_size
        if gemm not in QAT_GEMMS:
            raise ValueError(f"gemm={gemm!r}: expected one of {QAT_GEMMS}")
        self.clip_sigmas, self.clip_quantile, self.gemm = clip_sigmas, clip_quantile, gemm
        self._dense: tuple | None = None  # (key, dequantized weight in the compute dtype)
        # False: a plain linear until late QAT switches quantization on (tgolf.train: late_qat_threshold). An
        # instance attribute, so torch.compile guards on it and keeps one graph per value.
        self.active = True

    def _cache_settings(self) -> tuple:
        return (self.bits, self.group_size, self.clip_sigmas, self.clip_quantile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        if not self.active:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        settings = self._cache_settings()
        dequantized = (self._memo("_dense", x.dtype, lambda: qat_dense_weight(self.weight, *settings, x.dtype))
                       if self.gemm == "dense" else None)
        return qat_linear(x, self.weight, self.bias, *settings, self.gemm, dequantized)

    @torch.no_grad()
    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [out, in], float32 fp16-exact scales [out, G]): the exporter's codes = the trained ones."""
        return quantize_weight(self.weight, self.bits, self.group_size, self.clip_quantile, self.clip_sigmas)

    def extra_repr(self) -> str:
        clip = (f", clip_sigmas={self.clip_sigmas}" if self.clip_sigmas is not None else
                f", clip_quantile={self.clip_quantile}" if self.clip_quantile is not None else "")
        inactive = "" if self.active else ", active=False"
        return (f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}{clip}, gemm={self.gemm!r}"
                f"{inactive}")


def set_qat_active(model: nn.Module, active: bool) -> int:
    """Switch the quantization of every QATLinear in ``model`` on or off; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    for layer in layers:
        layer.active = active
    return len(layers)


class FP8Linear(nn.Linear):
    """``nn.Linear`` with e4m3 operands (power-of-two scales per tensor or per row) where fp8 tensor cores exist.

    CUDA sm_89+ (Hopper: torch._scaled_mm): fp8 forward, ``fp8_backward`` adds the e5m2 input-gradient GEMM.
    Older GPUs: the plain ``F.linear`` (bf16 under autocast). CPU: the fp8 arithmetic simulated exactly in fp32
    (or the Triton kernels under TRITON_INTERPRET=1), so the CPU tests cover the same math as the GPU.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scaling: str = "tensor",
                 fp8_backward: bool = False, device=None, dtype=None):
        check_fp8_scaling(scaling)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scaling, self.fp8_backward = scaling, bool(fp8_backward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        if x.device.type == "cuda" and not fp8_supported(x.device):
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return fp8_linear(x, self.weight, self.bias, self.scaling, self.fp8_backward)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling!r}, fp8_backward={self.fp8_backward}"
