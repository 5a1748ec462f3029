"""Dense packing of small integer codes into bytes, bit-exact for any length.

Two layouts, both little-endian and documented here because artifacts depend on them:

* ``pack_bits(codes, bits)``: each signed code ``c`` in ``[-2^(bits-1), 2^(bits-1) - 1]`` is stored as the
  unsigned ``c + 2^(bits-1)`` in ``bits`` bits; code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream,
  least significant bit first, and the stream fills bytes least significant bit first. The length is
  ``ceil(n * bits / 8)`` bytes and unused high bits of the last byte are zero.
* ``pack_base3(codes)``: ternary codes {-1, 0, +1} as base-3 digits ``c + 1``, five per byte
  (``3^5 = 243 <= 256``): byte ``j`` is ``sum(d[5j + i] * 3^i for i in 0..4)``. The length is ``ceil(n / 5)``
  bytes and the missing digits of the last byte are zero.

Unpacking takes the number of codes and rejects data of the wrong length, bytes out of range and non-zero
padding with a ValueError, so a truncated or corrupted artifact never loads silently.
"""
from __future__ import annotations

import numpy as np
import torch

_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _flat_int8(codes: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    array = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected an integer tensor, got dtype {array.dtype}")
    return array.reshape(-1)


def _flat_bytes(data: torch.Tensor | np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise ValueError(f"packed data: expected uint8, got {data.dtype}")
        return data.detach().cpu().numpy().reshape(-1)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"packed data: expected uint8, got {data.dtype}")
        return data.reshape(-1)
    return np.frombuffer(bytes(data), dtype=np.uint8)


def _check_count(n: int) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n={n!r}: the number of codes must be a non-negative integer")
    return int(n)


def _check_bits(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: expected an integer from 1 to 8")
    return int(bits)


def packed_bits_length(n: int, bits: int) -> int:
    """Bytes that ``pack_bits`` writes for ``n`` codes of ``bits`` bits."""
    return (_check_count(n) * _check_bits(bits) + 7) // 8


def packed_base3_length(n: int) -> int:
    """Bytes that ``pack_base3`` writes for ``n`` ternary codes."""
    return (_check_count(n) + 4) // 5


def pack_bits(codes: torch.Tensor | np.ndarray, bits: int) -> torch.Tensor:
    """Signed codes (any shape, flattened in C order) → uint8 [ceil(n*bits/8)]; see the module docstring."""
    bits = _check_bits(bits)
    flat = _flat_int8(codes, "codes")
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"codes out of range for {bits}-bit packing: [{flat.min()}, {flat.max()}] "
                         f"not within [{low}, {high}]")
    unsigned = (flat.astype(np.int16) - low).astype(np.uint8)
    stream = np.unpackbits(unsigned[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_bits(data: torch.Tensor | np.ndarray | bytes, bits: int, n: int) -> torch.Tensor:
    """uint8 data from ``pack_bits`` → int8 [n]; wrong length or non-zero padding raises ValueError."""
    bits, n = _check_bits(bits), _check_count(n)
    raw = _flat_bytes(data)
    expected = packed_bits_length(n, bits)
    if raw.size != expected:
        kind = "truncated" if raw.size < expected else "over-long"
        raise ValueError(f"{kind} packed data: {raw.size} bytes for {n} codes of {bits} bits, expected {expected}")
    stream = np.unpackbits(raw, bitorder="little")
    if stream[n * bits:].any():
        raise ValueError(f"corrupt packed data: padding bits after the {n} codes of {bits} bits are not zero")
    per_code = np.zeros((n, 8), dtype=np.uint8)
    per_code[:, :bits] = stream[: n * bits].reshape(n, bits)
    unsigned = np.packbits(per_code, axis=1, bitorder="little").reshape(-1)
    return torch.from_numpy((unsigned.astype(np.int16) - (1 << (bits - 1))).astype(np.int8))


def pack_base3(codes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Ternary codes {-1, 0, +1} (any shape, flattened in C order) → uint8 [ceil(n/5)], five digits per byte."""
    flat = _flat_int8(codes, "codes")
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError(f"ternary codes must be in {{-1, 0, 1}}, got range [{flat.min()}, {flat.max()}]")
    digits = np.zeros(packed_base3_length(flat.size) * 5, dtype=np.uint8)
    digits[: flat.size] = (flat + 1).astype(np.uint8)
    # max byte 2 * (1+3+9+27+81) = 242: the uint8 dot product cannot overflow
    return torch.from_numpy((digits.reshape(-1, 5) * _POW3).sum(axis=1, dtype=np.uint8))


def unpack_base3(data: torch.Tensor | np.ndarray | bytes, n: int) -> torch.Tensor:
    """uint8 data from ``pack_base3`` → int8 [n] in {-1, 0, 1}; bad length, bytes ≥ 243 or padding raise."""
    n = _check_count(n)
    raw = _flat_bytes(data)
    expected = packed_base3_length(n)
    if raw.size != expected:
        kind = "truncated" if raw.size < expected else "over-long"
        raise ValueError(f"{kind} base-3 data: {raw.size} bytes for {n} ternary codes, expected {expected}")
    if raw.size and raw.max() >= 243:
        raise ValueError(f"corrupt base-3 data: byte value {int(raw.max())} ≥ 243 = 3^5")
    digits = (raw[:, None] // _POW3) % 3
    flat = digits.reshape(-1)
    if flat[n:].any():
        raise ValueError(f"corrupt base-3 data: padding digits after the {n} codes are not zero")
    return torch.from_numpy(flat[:n].astype(np.int8) - 1)
