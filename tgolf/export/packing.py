"""Dense packing of small integer codes (and of a tensor's fp16 scales) into bytes, bit-exact for any length.

Four layouts, all little-endian and documented here because artifacts depend on them:

* ``pack_bits(codes, bits)``: each signed code ``c`` in ``[-2^(bits-1), 2^(bits-1) - 1]`` is stored as the
  unsigned ``c + 2^(bits-1)`` in ``bits`` bits; code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream,
  least significant bit first, and the stream fills bytes least significant bit first. The length is
  ``ceil(n * bits / 8)`` bytes and unused high bits of the last byte are zero.
* ``pack_base3(codes)``: ternary codes {-1, 0, +1} as base-3 digits ``c + 1``, five per byte
  (``3^5 = 243 <= 256``): byte ``j`` is ``sum(d[5j + i] * 3^i for i in 0..4)``. The length is ``ceil(n / 5)``
  bytes and the missing digits of the last byte are zero.
* ``pack_trits(codes)``: ternary codes as base-3 digits ``d = c + 1`` in blocks of ``TRIT_BLOCK = 959`` digits,
  each block one integer ``V = sum(d[959j + i] * 3^i for i in 0..958)`` written as ``TRIT_BLOCK_BYTES = 190``
  little-endian bytes (``3^959 < 2^1520``). A last block of ``r < 959`` digits takes the fewest bytes that hold
  ``3^r - 1``: ``ceil(bit_length(3^r - 1) / 8)``. 1.584984 bits per code, ``log2 3 = 1.584963`` plus 0.00002.
  Why 959 in 190: it is the densest block of at most 190 bytes, and the first with a loss under 0.00003 bits a
  code (five per byte: 1.6, loss 0.015; 111 in 22 bytes: 0.00062; 323 in 64: 0.00018; 747 in 148: 0.00004).
  The loss matters because the scales must fit in what is left below 1.60 bits a weight (about 0.015).
  Blocks are coded all at once with numpy: Horner's rule over 32-bit limbs held in uint64 (a limb times
  ``3^20`` plus a carry fits), decoding by long division by ``3^20``; 65M codes took 0.5-0.7 s each way
  on the 2-core development CPU.
* ``pack_fp16_adaptive(values)``: fp16 values (the scales of a tensor) losslessly in fewer than 16 bits each
  when they cluster, by their bit patterns ``p`` (uint16). Header: ``u16 lo`` (the smallest pattern),
  ``u8 s`` (0..16) and ``u16 nb - 1``; each value is the bucket ``(p - lo) >> s`` in ``[0, nb)`` followed by
  its ``s`` low bits. Buckets are arithmetic-coded with the adaptive Krichevsky–Trofimov estimator: before
  value ``i`` bucket ``b`` has probability ``(2 * count_b + 1) / (2 * i + nb)``, counted over all earlier
  values of the tensor, so no table travels. The code is rANS with an unbounded integer state (Duda 2013):
  pushing a bucket maps ``x`` to ``(x // f) * T + c + x % f`` (``f`` its frequency, ``c`` the frequencies
  below it, ``T`` the total), pushing the low bits maps ``x`` to ``x * 2^s + low``; values are pushed last to
  first (low bits, then bucket), so the decoder pops them first to last. Values go in segments of
  ``SCALE_SEGMENT = 2048`` (the state stays small): each segment is ``u16 L`` then its final state, starting
  from 0, in its fewest ``L`` little-endian bytes. The lengths make truncated or over-long data detectable (a
  shorter state may still decode to some values). The encoder picks ``s`` by the code length it predicts.

Unpacking takes the number of codes and rejects data of the wrong length, bytes or blocks out of range, non-zero
padding and (adaptive code) segments that do not decode back to state 0 with a ValueError, so a truncated or
corrupted artifact never loads silently.
"""
from __future__ import annotations

import functools
import math

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


def _check_length(raw: np.ndarray, expected: int, what: str) -> None:
    """Raise "truncated …" or "over-long …" when ``raw`` does not hold exactly ``expected`` bytes."""
    if raw.size != expected:
        kind = "truncated" if raw.size < expected else "over-long"
        raise ValueError(f"{kind} {what}, expected {expected}")


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
    _check_length(raw, packed_bits_length(n, bits), f"packed data: {raw.size} bytes for {n} codes of {bits} bits")
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
    _check_length(raw, packed_base3_length(n), f"base-3 data: {raw.size} bytes for {n} ternary codes")
    if raw.size and raw.max() >= 243:
        raise ValueError(f"corrupt base-3 data: byte value {int(raw.max())} ≥ 243 = 3^5")
    digits = (raw[:, None] // _POW3) % 3
    flat = digits.reshape(-1)
    if flat[n:].any():
        raise ValueError(f"corrupt base-3 data: padding digits after the {n} codes are not zero")
    return torch.from_numpy(flat[:n].astype(np.int8) - 1)


# --- base-3 blocks -------------------------------------------------------------------------------------------

TRIT_BLOCK = 959
TRIT_BLOCK_BYTES = 190
_CHUNK = 20  # digits per Horner step: 3^20 < 2^32, so limb * 3^20 + carry < 2^64
_BATCH_BLOCKS = 1 << 13  # blocks coded per numpy pass: bounds the temporaries to a few tens of MB
_LOW32 = np.uint64(0xFFFFFFFF)
_P10 = (3 ** np.arange(10)).astype(np.int32)


def _block_bytes(t: int) -> int:
    """Fewest bytes holding every t-digit base-3 number (0 for t = 0)."""
    return ((3 ** t - 1).bit_length() + 7) // 8


assert _block_bytes(TRIT_BLOCK) == TRIT_BLOCK_BYTES and _block_bytes(TRIT_BLOCK + 1) > TRIT_BLOCK_BYTES


@functools.cache
def _digits_of_3_10() -> np.ndarray:
    """uint8 [3^10, 10]: the ten base-3 digits of every number below 3^10, least significant first."""
    return ((np.arange(3 ** 10, dtype=np.int32)[:, None] // _P10) % 3).astype(np.uint8)


def packed_trits_length(n: int) -> int:
    """Bytes that ``pack_trits`` writes for ``n`` ternary codes."""
    full, rest = divmod(_check_count(n), TRIT_BLOCK)
    return full * TRIT_BLOCK_BYTES + _block_bytes(rest)


def _encode_blocks(digits: np.ndarray) -> np.ndarray:
    """Base-3 digits uint8 [B, t] → each row's number as ``_block_bytes(t)`` little-endian bytes, uint8 [B, nb]."""
    blocks, t = digits.shape
    nbytes = _block_bytes(t)
    nlimbs = (nbytes + 3) // 4
    tens = -(-t // 10)
    padded = np.zeros((blocks, tens * 10), dtype=np.uint8)
    padded[:, :t] = digits
    groups = (padded.reshape(blocks, tens, 10).astype(np.int32) @ _P10).astype(np.uint64)  # base 3^10 digits
    limbs = np.zeros((nlimbs, blocks), dtype=np.uint64)
    for start in reversed(range(0, t, _CHUNK)):  # Horner from the most significant chunk
        size = min(_CHUNK, t - start)
        chunk = groups[:, start // 10].copy()
        if size > 10:
            chunk += groups[:, start // 10 + 1] * np.uint64(3 ** 10)
        active = min(nlimbs, ((3 ** (t - start) - 1).bit_length() + 31) // 32)  # limbs the value can reach
        mult, carry = np.uint64(3 ** size), chunk
        for j in range(active):
            x = limbs[j] * mult + carry
            limbs[j] = x & _LOW32
            carry = x >> np.uint64(32)
    return np.ascontiguousarray(limbs.astype(np.uint32).T).view(np.uint8)[:, :nbytes]


def _decode_blocks(data: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [B, nb] from ``_encode_blocks`` → (digits uint8 [B, t], bool [B]: the number was ≥ 3^t)."""
    blocks, nbytes = data.shape
    nlimbs = (nbytes + 3) // 4
    padded = np.zeros((blocks, nlimbs * 4), dtype=np.uint8)
    padded[:, :nbytes] = data
    limbs = np.ascontiguousarray(padded.view(np.uint32).T).astype(np.uint64)
    table = _digits_of_3_10()
    digits = np.empty((blocks, -(-t // _CHUNK) * _CHUNK), dtype=np.uint8)
    for start in range(0, t, _CHUNK):  # long division by 3^20, least significant chunk first
        mult = np.uint64(3 ** min(_CHUNK, t - start))
        rem = np.zeros(blocks, dtype=np.uint64)
        for j in reversed(range(nlimbs)):
            cur = (rem << np.uint64(32)) | limbs[j]
            limbs[j] = cur // mult
            rem = cur - limbs[j] * mult
        rem = rem.astype(np.int64)
        high = rem // 3 ** 10
        digits[:, start: start + 10] = table[rem - high * 3 ** 10]
        digits[:, start + 10: start + 20] = table[high]
    return digits[:, :t], limbs.any(axis=0)


def pack_trits(codes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Ternary codes {-1, 0, +1} (any shape, flattened in C order) → uint8 [packed_trits_length(n)], 959 per 190 B."""
    flat = _flat_int8(codes, "codes")
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError(f"ternary codes must be in {{-1, 0, 1}}, got range [{flat.min()}, {flat.max()}]")
    digits = (flat + 1).astype(np.uint8)
    full = flat.size // TRIT_BLOCK
    parts = [_encode_blocks(digits[i * TRIT_BLOCK: min(full, i + _BATCH_BLOCKS) * TRIT_BLOCK].reshape(-1, TRIT_BLOCK))
             for i in range(0, full, _BATCH_BLOCKS)]
    if flat.size > full * TRIT_BLOCK:
        parts.append(_encode_blocks(digits[full * TRIT_BLOCK:][None]))
    out = np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0, dtype=np.uint8)
    return torch.from_numpy(out)


def unpack_trits(data: torch.Tensor | np.ndarray | bytes, n: int) -> torch.Tensor:
    """uint8 data from ``pack_trits`` → int8 [n] in {-1, 0, 1}; a wrong length or a block ≥ 3^t raises."""
    n = _check_count(n)
    raw = _flat_bytes(data)
    _check_length(raw, packed_trits_length(n), f"base-3 block data: {raw.size} bytes for {n} ternary codes")
    full, rest = divmod(n, TRIT_BLOCK)
    out = np.empty(n, dtype=np.int8)
    spans = [(i, min(full, i + _BATCH_BLOCKS), TRIT_BLOCK) for i in range(0, full, _BATCH_BLOCKS)]
    if rest:
        spans.append((full, full + 1, rest))
    for first, stop, t in spans:
        block_data = raw[first * TRIT_BLOCK_BYTES: first * TRIT_BLOCK_BYTES + (stop - first) * _block_bytes(t)]
        digits, too_big = _decode_blocks(block_data.reshape(stop - first, _block_bytes(t)), t)
        if too_big.any():
            block = first + int(np.argmax(too_big))
            raise ValueError(f"corrupt base-3 block data: block {block} holds a number ≥ 3^{t}")
        out[first * TRIT_BLOCK: first * TRIT_BLOCK + digits.size] = digits.reshape(-1).astype(np.int8) - 1
    return torch.from_numpy(out)


# --- fp16 values, adaptive arithmetic code -------------------------------------------------------------------

SCALE_SEGMENT = 2048
_ADAPTIVE_HEADER = 5  # u16 lo, u8 s, u16 nb - 1


class _Counts:
    """Fenwick tree over the KT weights ``2 * count + 1`` of ``nb`` buckets: O(log nb) query, update and search."""

    def __init__(self, nb: int):
        self.nb = nb
        self.tree = [0] * (nb + 1)
        for i in range(1, nb + 1):  # every weight starts at 1: node i covers (i & -i) buckets
            self.tree[i] = i & -i
        self.total = nb
        self.top = 1 << (nb.bit_length() - 1)

    def below(self, b: int) -> int:
        """Sum of the weights of buckets 0..b-1."""
        s = 0
        while b > 0:
            s += self.tree[b]
            b &= b - 1
        return s

    def weight(self, b: int) -> int:
        return self.below(b + 1) - self.below(b)

    def add(self, b: int) -> None:
        self.total += 2
        b += 1
        while b <= self.nb:
            self.tree[b] += 2
            b += b & -b

    def find(self, r: int) -> tuple[int, int]:
        """(bucket b, weights below b) with below(b) <= r < below(b + 1), for 0 <= r < total."""
        pos, below, step = 0, 0, self.top
        while step:
            nxt = pos + step
            if nxt <= self.nb and below + self.tree[nxt] <= r:
                pos, below = nxt, below + self.tree[nxt]
            step >>= 1
        return pos, below


def _fp16_patterns(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        if values.dtype != torch.float16:
            raise ValueError(f"values: expected float16, got {values.dtype}")
        return values.detach().cpu().reshape(-1).view(torch.int16).numpy().view(np.uint16).astype(np.int64)
    array = np.asarray(values)
    if array.dtype != np.float16:
        raise ValueError(f"values: expected float16, got {array.dtype}")
    return array.reshape(-1).view(np.uint16).astype(np.int64)


def _kt_bits(counts: np.ndarray) -> float:
    """Code length in bits of a sequence with these bucket counts under the adaptive KT estimator (any order)."""
    n, nb = int(counts.sum()), counts.size
    used = counts[counts > 0].astype(np.float64)
    nats = (math.lgamma(n + nb / 2) - math.lgamma(nb / 2)
            - sum(math.lgamma(c + 0.5) for c in used.tolist()) + used.size * math.lgamma(0.5))
    return nats / math.log(2)


def _choose_shift(offsets: np.ndarray) -> int:
    """The low-bit count s with the shortest predicted code (buckets by KT, low bits raw)."""
    costs = [(_kt_bits(np.bincount(offsets >> s)) + s * offsets.size, s) for s in range(17)]
    return min(costs)[1]


def pack_fp16_adaptive(values: torch.Tensor | np.ndarray) -> bytes:
    """fp16 values (any shape, C order) → the adaptive arithmetic code described in the module docstring."""
    patterns = _fp16_patterns(values)
    if patterns.size == 0:
        return b""
    lo = int(patterns.min())
    offsets = patterns - lo
    s = _choose_shift(offsets)
    buckets, lows = (offsets >> s).tolist(), (offsets & ((1 << s) - 1)).tolist()
    nb = max(buckets) + 1
    counts = _Counts(nb)
    steps = []  # (c, f, T) of each value's bucket, in the decoder's order
    for b in buckets:
        steps.append((counts.below(b), counts.weight(b), counts.total))
        counts.add(b)
    out = [lo.to_bytes(2, "little"), bytes([s]), (nb - 1).to_bytes(2, "little")]
    for first in range(0, len(buckets), SCALE_SEGMENT):
        x = 0
        for i in reversed(range(first, min(first + SCALE_SEGMENT, len(buckets)))):
            x = (x << s) | lows[i]
            c, f, total = steps[i]
            q, r = divmod(x, f)
            x = q * total + c + r
        state = x.to_bytes((x.bit_length() + 7) // 8, "little")
        if len(state) > 0xFFFF:  # a value costs < log2(2n + 2^16) + 16 bits: < 64 KiB a segment for n < 2^40
            raise ValueError(f"adaptive code: a segment of {SCALE_SEGMENT} values took {len(state)} bytes")
        out += [len(state).to_bytes(2, "little"), state]
    return b"".join(out)


def unpack_fp16_adaptive(data: torch.Tensor | np.ndarray | bytes, n: int) -> torch.Tensor:
    """Bytes from ``pack_fp16_adaptive`` → float16 [n]; truncated, over-long or corrupt data raises ValueError."""
    n = _check_count(n)
    raw = _flat_bytes(data).tobytes()
    if n == 0:
        if raw:
            raise ValueError(f"over-long adaptive code: {len(raw)} bytes for 0 values")
        return torch.zeros(0, dtype=torch.float16)
    if len(raw) < _ADAPTIVE_HEADER:
        raise ValueError(f"truncated adaptive code: {len(raw)} bytes, shorter than its {_ADAPTIVE_HEADER}-byte header")
    lo, s, nb = int.from_bytes(raw[0:2], "little"), raw[2], int.from_bytes(raw[3:5], "little") + 1
    if s > 16 or lo + ((nb - 1) << s) > 0xFFFF:
        raise ValueError(f"corrupt adaptive code header: lo={lo}, s={s}, buckets={nb} reach past 16-bit patterns")
    counts, mask, pos = _Counts(nb), (1 << s) - 1, _ADAPTIVE_HEADER
    patterns = np.empty(n, dtype=np.uint16)
    for first in range(0, n, SCALE_SEGMENT):
        if pos + 2 > len(raw):
            raise ValueError(f"truncated adaptive code: segment at value {first} is missing")
        length = int.from_bytes(raw[pos: pos + 2], "little")
        pos += 2
        if pos + length > len(raw):
            raise ValueError(f"truncated adaptive code: segment at value {first} needs {length} bytes, "
                             f"{len(raw) - pos} left")
        if length and raw[pos + length - 1] == 0:
            raise ValueError(f"corrupt adaptive code: segment at value {first} ends in a zero byte "
                             f"(states are written in their fewest bytes)")
        x = int.from_bytes(raw[pos: pos + length], "little")
        pos += length
        for i in range(first, min(first + SCALE_SEGMENT, n)):
            q, r = divmod(x, counts.total)
            b, c = counts.find(r)
            x = q * counts.weight(b) + r - c
            counts.add(b)
            pattern = lo + (b << s) + (x & mask)
            if pattern > 0xFFFF:
                raise ValueError(f"corrupt adaptive code: value {i} decodes to pattern {pattern} > 0xFFFF")
            patterns[i] = pattern
            x >>= s
        if x:
            raise ValueError(f"corrupt adaptive code: segment at value {first} does not decode back to state 0")
    if pos != len(raw):
        raise ValueError(f"over-long adaptive code: {len(raw) - pos} bytes after the last segment")
    return torch.from_numpy(patterns.view(np.int16).copy()).view(torch.float16)
