"""The 2-bit kernel format of ternary weights (artifacts use the denser base-3 blocks of tgolf.export.packing.pack_trits).

Layout, shared with the CUDA kernels: code ``c`` in {-1, 0, 1} is stored as ``c + 1`` in {0, 1, 2}, four codes per
byte along K; code ``j`` of a row sits at bits ``2·(j % 4)`` of byte ``j // 4`` (least significant first). Each row
is padded with zero-codes (stored value 1) to a multiple of 4, so ``codes [..., K]`` → ``uint8 [..., ⌈K/4⌉]``.
The stored value 3 never occurs; unpacking rejects it, non-zero-code padding and wrong lengths with a ValueError.
"""
from __future__ import annotations

import torch

_SHIFTS = (0, 2, 4, 6)
ZERO_CODE = 1  # stored value of code 0


def packed_length(in_features: int) -> int:
    """Bytes per row of the 2-bit format."""
    return (in_features + 3) // 4


def pack2(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes (integer tensor [..., K] in {-1, 0, 1}) → uint8 [..., ⌈K/4⌉]."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes: expected at least one dimension (the packed one is the last)")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"codes must be in {{-1, 0, 1}}, got range [{int(codes.min())}, {int(codes.max())}]")
    k = codes.shape[-1]
    stored = (codes.to(torch.int16) + 1).to(torch.uint8)
    stored = torch.nn.functional.pad(stored, (0, (-k) % 4), value=ZERO_CODE)
    quads = stored.reshape(*codes.shape[:-1], -1, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def unpack2(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [..., ⌈K/4⌉] from ``pack2`` → int8 codes [..., K]; bad lengths or bytes raise ValueError."""
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 0:
        raise ValueError(f"in_features={in_features!r}: must be a non-negative integer")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected uint8, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed: expected at least one dimension (the packed one is the last)")
    expected = packed_length(in_features)
    if packed.shape[-1] != expected:
        kind = "truncated" if packed.shape[-1] < expected else "over-long"
        raise ValueError(f"{kind} 2-bit packed data: last dimension {packed.shape[-1]} bytes for "
                         f"in_features={in_features}, expected {expected}")
    stored = torch.stack([(packed >> s) & 3 for s in _SHIFTS], dim=-1).reshape(*packed.shape[:-1], -1)
    if stored.numel() and bool((stored == 3).any()):
        raise ValueError("corrupt 2-bit packed data: stored value 3 is not a ternary code")
    if bool((stored[..., in_features:] != ZERO_CODE).any()):
        raise ValueError(f"corrupt 2-bit packed data: padding after the {in_features} codes is not zero-codes")
    return (stored[..., :in_features].to(torch.int8) - 1).contiguous()
