"""TernaryLinear: a drop-in ``nn.Linear`` whose forward uses ternary weights {-1, 0, +1} × absmean scales.

The latent weight stays a full-precision ``weight`` parameter (same state dict as ``nn.Linear``); the forward
quantizes it (tgolf.ops.ternary) and gradients reach it through a straight-through estimator.

Quantization cache (tgolf.nn.weight_cache): the codes, scales, 2-bit packed codes and the dequantized copy of the
"dense" GEMMs are made once per weight update, not once per micro-batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tgolf.nn.weight_cache import PerUpdateCache
from tgolf.ops.ternary import (PACKED_MAX_M, check_gemm, compute_dtype, default_gemm, dense_weight, int8_linear,
                               packed_matmul, ternary_linear_quantized, ternary_quantize)
from tgolf.ops.ternary.reference import check_act_bits, group_count

__all__ = ["TernaryLinear"]


class TernaryLinear(PerUpdateCache, nn.Linear):
    """``nn.Linear`` with ternary weights (BitNet b1.58); ``act_bits=8`` adds per-token int8 activations.

    ``group_size``: None for one absmean scale per output row, else one per ``group_size`` input columns.
    ``gemm``: how training GEMMs multiply by the ternary weight: "dense" (cuBLAS with a dequantized copy made once
    per weight update; the default without ``act_bits``: measured faster) or "codes" (Triton GEMMs reading the int8
    codes; the default and only choice with ``act_bits=8``). See ``tgolf.ops.ternary.default_gemm``.
    """

    CACHE_SLOTS = ("_cache", "_dense")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None,
                 act_bits: int | None = None, gemm: str | None = None, device=None, dtype=None):
        group_count(in_features, group_size)
        check_act_bits(act_bits)
        gemm = default_gemm(act_bits) if gemm is None else gemm
        check_gemm(gemm, act_bits)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.group_size = group_size
        self.act_bits = act_bits
        self.gemm = gemm
        self._cache: tuple | None = None  # (key, (codes, scales, packed))
        self._dense: tuple | None = None  # (key, dense weight in the compute dtype)

    def _cache_settings(self) -> tuple:
        return (self.group_size,)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes int8 [N, K], scales f32 [N, G], packed uint8 [N, ⌈K/4⌉]) of the current weight."""
        return self._memo("_cache", None, lambda: ternary_quantize(self.weight, self.group_size))

    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [N, K] in {-1, 0, 1}, scales float32 [N, G] exactly representable in fp16)."""
        codes, scales, _ = self.quantized()
        return codes, scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scales, packed = self.quantized()
        if not torch.is_grad_enabled():  # inference: packed weights for few tokens, fused int8 kernels
            tokens = x.numel() // max(x.shape[-1], 1)
            if self.act_bits == 8:
                return int8_linear(x, codes, scales, self.bias, self.group_size)
            if tokens <= PACKED_MAX_M:
                y = packed_matmul(x, packed, scales, self.in_features, self.group_size)
                return y if self.bias is None else y + self.bias.to(y.dtype)
        dense = self._dense_weight(codes, scales, compute_dtype(x)) if self.gemm == "dense" else None
        return ternary_linear_quantized(x, self.weight, codes, scales, self.bias, self.group_size, self.act_bits,
                                        self.gemm, dense)

    def _dense_weight(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in ``dtype``, made once per weight update (like the codes) and per dtype."""
        return self._memo("_dense", dtype, lambda: dense_weight(codes, scales, self.group_size, dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, act_bits={self.act_bits}, gemm={self.gemm!r}"
