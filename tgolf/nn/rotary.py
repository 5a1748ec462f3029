"""Rotary position embeddings (RoPE), shared by every attention module."""
from __future__ import annotations

import torch
import torch.nn as nn


class Rotary(nn.Module):
    """Caches cos/sin tables per (length, device); applies the half-split rotation to [B, H, T, D] tensors."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cache = (seq_len, device, freqs.cos(), freqs.sin())
        cos, sin = self._cache[2][:seq_len], self._cache[3][:seq_len]
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] (or [B, T, H, D] with cos/sin broadcast accordingly); cos, sin [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
