"""Rotary position embeddings (RoPE), shared by every attention module."""
from __future__ import annotations

import torch
import torch.nn as nn


class Rotary(nn.Module):
    """Caches cos/sin tables per (length, device) for the half-split rotation of [B, H, T, D] tensors.

    ``rope_dims`` (even, 0 = ``head_dim``): only the first ``rope_dims`` dimensions of each head rotate, with
    frequencies spread over them; the rest carry no position (partial RoPE: 16 of 64 in the 1.1248 record,
    openai/parameter-golf PR #315). The tables then have rope_dims / 2 columns, which is how ``apply_rotary``
    knows how many dimensions to rotate.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, rope_dims: int = 0):
        super().__init__()
        rope_dims = rope_dims or head_dim
        if rope_dims % 2 or not 0 < rope_dims <= head_dim:
            raise ValueError(f"Rotary: rope_dims={rope_dims} must be even and in 1..head_dim={head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims))
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
    """x [B, H, T, D] (or [B, T, H, D] with cos/sin broadcast accordingly); cos, sin [T, R/2]: the first R
    dimensions of x rotate, the others pass through."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    rotated = (x1 * cos + x2 * sin, x2 * cos - x1 * sin)
    return torch.cat(rotated if 2 * half == x.shape[-1] else (*rotated, x[..., 2 * half:]), dim=-1)
