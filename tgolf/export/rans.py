"""Interleaved rANS with row and column contexts: an entropy coder for the integer codes of quantized matrices.

Why: the general compressors are not built for independent symbols whose spread changes from row to row and
column to column. On 1M int6 codes of Gaussian rows (SDClip at 12.85 σ) the order-0 entropy is 3.328 bits a
code; brotli-11 reaches 3.375, lzma-9e 3.490, and this coder 3.331. A trained matrix's columns (its input
features) also differ in spread, most in the MLP's output projection, whose columns are the hidden units; the
coder splits a matrix's rows and its columns into a few groups by their codes' mean magnitude and keeps one
histogram per (row group, column group), choosing the numbers of groups per matrix by the bytes they cost
(``python -m tgolf.export.measure_codes`` measures it on an artifact).

rANS (J. Duda, "Asymmetric numeral systems", arXiv:1311.2540) with a 64-bit state, 32-bit renormalisation words and
probabilities in 16 bits. One buffer codes one matrix [N, K]; its layout (little-endian):

    i16  low       the smallest code
    u16  A - 1     A = the alphabet size: the codes lie in [low, low + A)
    u8   r, c      log2 of the numbers of row and column groups, R = 2^r and C = 2^c (both 0 when A == 1)
    row groups     N ids of r bits, bit plane by bit plane (np.packbits, little bit order), r · ceil(N / 8) bytes
    column groups  K ids of c bits, the same way
    u16 × A × R·C  one frequency table per (row group, column group), row group major, each summing to 2^16
                   (a code absent from a group may have 0), only when A > 1
    u64 × W        the lanes' final encoder states, W = ceil(N·K / STEPS) lanes (none when A == 1)
    u32 × ...      the renormalisation words, to the end of the buffer

Code i of the matrix (C order) belongs to lane i mod W, at step i div W; each lane is an rANS stream of its own,
and the words of all lanes are stored in the order the decoder reads them: by step, then by lane. Lanes turn the
coder into whole-array numpy operations over at most STEPS steps, for any number of matrices at once (their lanes
side by side), so an export codes tens of millions of codes in seconds; each lane costs its final state (8 bytes,
about 0.004 bits a code when it holds STEPS codes).
A decoder checks that each lane ends in the initial state and that every word is read exactly once, so a damaged
or truncated buffer raises RansError (a ValueError) rather than returning wrong codes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

PROB_BITS = 16
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = np.uint64(1 << 32)  # a lane's state lies in [STATE_LOW, 2^64) between codes
WORD_BITS = np.uint64(32)
STEPS = 16384
GROUP_BITS = ((0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2),
              (3, 0))  # the (r, c) the encoder tries; a decoder reads any r, c <= MAX_GROUP_BITS
MAX_GROUP_BITS = 8
MAX_ALPHABET = 4096
_HEAD = struct.Struct("<hHBB")


class RansError(ValueError):
    """A damaged or truncated rANS buffer; ``stream`` is its index among the buffers decoded together."""

    def __init__(self, stream: int, message: str):
        super().__init__(message)
        self.stream = stream


def order0_bits(codes: torch.Tensor) -> float:
    """The codes' order-0 entropy in bits (all of them): the floor of a coder that sees codes one at a time with
    one histogram, computed where the codes are."""
    if not codes.numel():
        return 0.0
    counts = torch.bincount(codes.reshape(-1).long() - int(codes.min())).double()
    counts = counts[counts > 0]
    return float(-(counts * torch.log2(counts / counts.sum())).sum())


def lanes_for(n: int) -> int:
    """Lanes of a matrix of ``n`` codes (part of the format: the decoder derives it the same way)."""
    return -(-n // STEPS)


def _normalised_frequencies(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to PROB_SCALE, at least 1 for each code that occurs, 0 for the others."""
    total = int(counts.sum())
    freqs = np.where(counts > 0, np.maximum(1, (counts * PROB_SCALE) // total), 0).astype(np.int64)
    surplus = int(freqs.sum()) - PROB_SCALE
    for i in np.argsort(-freqs, kind="stable"):  # the rounding error goes to the most frequent codes: it costs least
        step = -surplus if surplus < 0 else min(surplus, int(freqs[i]) - 1)
        freqs[i] += step if surplus < 0 else -step
        surplus += step if surplus < 0 else -step
        if not surplus:
            break
    return freqs


def _groups(magnitude: np.ndarray, bits: int) -> np.ndarray:
    """Group ids 0..2^bits - 1 of rows (or columns) by the quantiles of their codes' mean magnitude."""
    if bits == 0:
        return np.zeros(len(magnitude), dtype=np.int64)
    edges = np.quantile(magnitude, np.arange(1, 1 << bits) / (1 << bits))
    return np.searchsorted(edges, magnitude, side="right").astype(np.int64)


def _pack_ids(ids: np.ndarray, bits: int) -> bytes:
    return b"".join(np.packbits((ids >> b) & 1, bitorder="little").tobytes() for b in range(bits))


def _unpack_ids(buf: bytes, count: int, bits: int) -> np.ndarray:
    plane = -(-count // 8)
    ids = np.zeros(count, dtype=np.int64)
    for b in range(bits):
        raw = np.frombuffer(buf, dtype=np.uint8, count=plane, offset=b * plane)
        ids |= np.unpackbits(raw, count=count, bitorder="little").astype(np.int64) << b
    return ids


@dataclass
class _Model:
    """One matrix's coding model: alphabet, row and column groups, and a frequency table per group pair."""
    low: int
    size: int              # A
    row_bits: int
    col_bits: int
    rows: np.ndarray       # int64 [N] group ids
    cols: np.ndarray       # int64 [K] group ids
    freqs: np.ndarray      # int64 [R·C, A]

    @property
    def coded(self) -> bool:
        return self.size > 1

    def contexts(self) -> np.ndarray:
        return _contexts(self.rows, self.cols, self.col_bits)

    def header(self) -> bytes:
        head = _HEAD.pack(self.low, self.size - 1, self.row_bits, self.col_bits)
        if not self.coded:
            return head
        return (head + _pack_ids(self.rows, self.row_bits) + _pack_ids(self.cols, self.col_bits)
                + self.freqs.astype("<u2").tobytes())


def _contexts(rows: np.ndarray, cols: np.ndarray, col_bits: int) -> np.ndarray:
    """The table index (row group, column group) of every code of the matrix, C order."""
    return ((rows[:, None] << col_bits) + cols[None, :]).reshape(-1)


def _group_counts(codes: np.ndarray, rows: np.ndarray, cols: np.ndarray, row_bits: int, col_bits: int,
                  size: int) -> tuple[np.ndarray, float]:
    """Each table's code counts [R·C, A], and the bits they cost: the codes under those histograms, plus the
    tables and the group ids."""
    tables = 1 << (row_bits + col_bits)
    context = _contexts(rows, cols, col_bits)
    counts = np.bincount(context * size + codes.reshape(-1), minlength=tables * size).reshape(tables, size)
    totals = counts.sum(axis=1, keepdims=True)
    nz = counts > 0
    info = -(counts[nz] * np.log2(counts[nz] / np.broadcast_to(totals, counts.shape)[nz])).sum()
    return counts, float(info) + 16 * size * tables + row_bits * len(rows) + col_bits * len(cols)


def _model_of(codes: np.ndarray) -> _Model:
    """The grouping of GROUP_BITS that costs the fewest estimated bits for this matrix [N, K] of codes."""
    n, k = codes.shape
    low, high = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
    if high - low + 1 > MAX_ALPHABET or not -(1 << 15) <= low < (1 << 15):
        raise ValueError(f"codes span [{low}, {high}]: the rANS coder takes at most {MAX_ALPHABET} values "
                         f"from a 16-bit range")
    size = high - low + 1
    zero_rows, zero_cols = np.zeros(n, dtype=np.int64), np.zeros(k, dtype=np.int64)
    if size == 1:
        return _Model(low, 1, 0, 0, zero_rows, zero_cols, np.array([[PROB_SCALE]], dtype=np.int64))
    shifted = codes.astype(np.int64) - low
    magnitude = np.abs(codes.astype(np.float64))
    row_mag, col_mag = magnitude.mean(axis=1), magnitude.mean(axis=0)
    best = None
    for row_bits, col_bits in GROUP_BITS:
        if (1 << row_bits) > n or (1 << col_bits) > k:
            continue
        rows, cols = _groups(row_mag, row_bits), _groups(col_mag, col_bits)
        counts, bits = _group_counts(shifted, rows, cols, row_bits, col_bits, size)
        if best is None or bits < best[0]:
            best = (bits, row_bits, col_bits, rows, cols, counts)
    _, row_bits, col_bits, rows, cols, counts = best
    freqs = np.stack([_normalised_frequencies(c) if c.any() else _uniform(size) for c in counts])
    return _Model(low, size, row_bits, col_bits, rows, cols, freqs)


def _uniform(size: int) -> np.ndarray:
    """The table of a group pair that holds no code (a valid table that is never used)."""
    freqs = np.full(size, PROB_SCALE // size, dtype=np.int64)
    freqs[: PROB_SCALE - int(freqs.sum())] += 1
    return freqs


@dataclass
class _Lanes:
    """The lanes of several matrices side by side."""
    stream: np.ndarray   # int64 [total lanes]: the matrix each lane belongs to
    first: np.ndarray    # int64 [matrices]: its first lane
    width: np.ndarray    # int64 [matrices]: its lane count W (0 when it has nothing to code)
    steps: np.ndarray    # int64 [total lanes]: the codes (steps) each lane holds

    @classmethod
    def build(cls, sizes: Sequence[int], coded: Sequence[bool]) -> "_Lanes":
        width = np.array([lanes_for(n) if c else 0 for n, c in zip(sizes, coded)], dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(width)[:-1]]).astype(np.int64)
        stream = np.repeat(np.arange(len(sizes), dtype=np.int64), width)
        lane_in_stream = np.arange(int(width.sum()), dtype=np.int64) - first[stream]
        n = np.asarray(sizes, dtype=np.int64)[stream]
        steps = (n - lane_in_stream + width[stream] - 1) // np.maximum(width[stream], 1)
        return cls(stream, first, width, steps)

    def matrix(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """[STEPS, total lanes] int32: each matrix's flat ``values`` laid out by step and lane, -1 past the end."""
        out = np.full((STEPS, len(self.stream)), -1, dtype=np.int32)
        for i, flat in enumerate(values):
            w = int(self.width[i])
            if w:
                padded = np.full(STEPS * w, -1, dtype=np.int32)
                padded[: len(flat)] = flat
                out[:, self.first[i]: self.first[i] + w] = padded.reshape(STEPS, w)
        return out


@dataclass
class _Tables:
    """Every matrix's frequency tables end to end: entry e is code (e - table_start[t]) of table t."""
    freqs: np.ndarray        # uint64 [entries]
    cum: np.ndarray          # uint64 [entries]: start of each code's slot range in its table
    table_start: np.ndarray  # int64 [tables]: first entry of each table
    first_table: np.ndarray  # int64 [matrices]: the index of each matrix's first table
    keys: np.ndarray         # int64 [entries]: table index · 2^16 + cum, increasing: the decoder's search keys

    @classmethod
    def build(cls, models: Sequence[_Model]) -> "_Tables":
        per_table = [row for m in models for row in (m.freqs if m.coded else np.zeros((0, 1), np.int64))]
        sizes = np.array([len(t) for t in per_table], dtype=np.int64)
        table_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        freqs = np.concatenate(per_table) if per_table else np.zeros(0, dtype=np.int64)
        cum = np.concatenate([np.cumsum(t) - t for t in per_table]) if per_table else freqs
        counts = [len(m.freqs) if m.coded else 0 for m in models]
        first_table = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        keys = np.repeat(np.arange(len(per_table), dtype=np.int64), sizes) * PROB_SCALE + cum
        return cls(freqs.astype(np.uint64), cum.astype(np.uint64), table_start, first_table, keys)


def rans_encode(matrices: Sequence[np.ndarray]) -> list[bytes]:
    """One buffer per matrix of integer codes ([N, K]; 1-D arrays are taken as one row), coded in one pass."""
    arrays = [np.asarray(m).reshape(1, -1) if np.ndim(m) < 2 else np.asarray(m) for m in matrices]
    models = [_model_of(a) for a in arrays]
    lanes = _Lanes.build([a.size for a in arrays], [m.coded for m in models])
    tables = _Tables.build(models)
    entries = [tables.table_start[tables.first_table[i] + m.contexts()] + (a.reshape(-1).astype(np.int64) - m.low)
               if m.coded else np.zeros(0, np.int64) for i, (a, m) in enumerate(zip(arrays, models))]
    matrix = lanes.matrix(entries)
    state = np.full(len(lanes.stream), STATE_LOW, dtype=np.uint64)
    emitted: list[tuple[np.ndarray, np.ndarray]] = []
    for step in range(int(lanes.steps.max()) - 1 if len(state) else -1, -1, -1):
        e = matrix[step]
        live = e >= 0
        e = np.where(live, e, 0)
        f = np.where(live, tables.freqs[e], np.uint64(1))
        out = live & (state >= (f << np.uint64(64 - PROB_BITS)))
        if out.any():
            idx = np.flatnonzero(out)
            emitted.append((step * len(state) + idx, (state[idx] & np.uint64(0xFFFFFFFF)).astype(np.uint32)))
            state[idx] >>= WORD_BITS
        coded = ((state // f) << np.uint64(PROB_BITS)) + state % f + tables.cum[e]
        state = np.where(live, coded, state)
    keys = np.concatenate([k for k, _ in emitted]) if emitted else np.zeros(0, dtype=np.int64)
    words = np.concatenate([w for _, w in emitted]) if emitted else np.zeros(0, dtype=np.uint32)
    order = np.argsort(keys, kind="stable")  # the decoder's order: by step, then by lane
    owner = lanes.stream[keys[order] % max(len(state), 1)]
    by_matrix = order[np.argsort(owner, kind="stable")]
    ends = np.searchsorted(np.sort(owner, kind="stable"), np.arange(len(arrays) + 1))
    buffers = []
    for i, model in enumerate(models):
        lo, w = int(lanes.first[i]), int(lanes.width[i])
        buffers.append(model.header() + state[lo: lo + w].astype("<u8").tobytes()
                       + words[by_matrix[ends[i]: ends[i + 1]]].astype("<u4").tobytes())
    return buffers


def _parse(buf: bytes, shape: tuple[int, int], index: int) -> tuple[_Model, np.ndarray, np.ndarray]:
    """(model, lane states, words) of one buffer, its lengths and tables checked."""
    n, k = shape
    if len(buf) < _HEAD.size:
        raise RansError(index, f"{len(buf)} bytes is shorter than the {_HEAD.size}-byte head")
    low, size, row_bits, col_bits = _HEAD.unpack_from(buf)
    size += 1
    zero_rows, zero_cols = np.zeros(n, dtype=np.int64), np.zeros(k, dtype=np.int64)
    if size == 1:
        if len(buf) != _HEAD.size or row_bits or col_bits:
            raise RansError(index, f"a one-code alphabet has only its {_HEAD.size}-byte head, got {len(buf)} bytes")
        return (_Model(low, 1, 0, 0, zero_rows, zero_cols, np.array([[PROB_SCALE]], np.int64)),
                np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    if size > MAX_ALPHABET or row_bits > MAX_GROUP_BITS or col_bits > MAX_GROUP_BITS:
        raise RansError(index, f"alphabet {size} or group bits ({row_bits}, {col_bits}) out of range "
                               f"(at most {MAX_ALPHABET} and {MAX_GROUP_BITS})")
    tables = 1 << (row_bits + col_bits)
    row_bytes, col_bytes = row_bits * -(-n // 8), col_bits * -(-k // 8)
    lanes = lanes_for(n * k)
    fixed = _HEAD.size + row_bytes + col_bytes + 2 * size * tables + 8 * lanes
    if len(buf) < fixed or (len(buf) - fixed) % 4:
        raise RansError(index, f"{len(buf)} bytes do not hold a head, group ids, {tables} tables of {size} "
                               f"frequencies, {lanes} lane states and whole 4-byte words for {n * k} codes")
    offset = _HEAD.size
    rows = _unpack_ids(buf[offset: offset + row_bytes], n, row_bits)
    cols = _unpack_ids(buf[offset + row_bytes: offset + row_bytes + col_bytes], k, col_bits)
    offset += row_bytes + col_bytes
    freqs = np.frombuffer(buf, dtype="<u2", count=size * tables, offset=offset).astype(np.int64).reshape(tables, size)
    if (freqs.sum(axis=1) != PROB_SCALE).any():
        raise RansError(index, f"a frequency table does not sum to {PROB_SCALE}")
    states = np.frombuffer(buf, dtype="<u8", count=lanes, offset=offset + 2 * size * tables).astype(np.uint64)
    words = np.frombuffer(buf, dtype="<u4", offset=fixed).astype(np.uint64)
    return _Model(low, size, row_bits, col_bits, rows, cols, freqs), states, words


def rans_decode(buffers: Sequence[bytes], shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """The int64 codes [N, K] of each buffer, decoded in one pass; RansError if one is damaged."""
    if len(buffers) != len(shapes):
        raise ValueError(f"rans_decode: {len(buffers)} buffers but {len(shapes)} shapes")
    shapes = [(int(n), int(k)) for n, k in shapes]
    parsed = [_parse(bytes(b), s, i) for i, (b, s) in enumerate(zip(buffers, shapes))]
    models = [p[0] for p in parsed]
    sizes = [n * k for n, k in shapes]
    lanes = _Lanes.build(sizes, [m.coded and n > 0 for m, n in zip(models, sizes)])
    tables = _Tables.build(models)
    context = lanes.matrix([tables.first_table[i] + m.contexts() if m.coded else np.zeros(0, np.int64)
                            for i, m in enumerate(models)])
    state = np.concatenate([p[1] for p in parsed]) if parsed else np.zeros(0, dtype=np.uint64)
    word_counts = np.array([len(p[2]) for p in parsed], dtype=np.int64)
    words = np.concatenate([p[2] for p in parsed]) if parsed else np.zeros(0, dtype=np.uint64)
    pointer = np.concatenate([[0], np.cumsum(word_counts)[:-1]]).astype(np.int64)
    end = pointer + word_counts
    out = np.zeros((STEPS, len(state)), dtype=np.int32)
    mask = np.uint64(PROB_SCALE - 1)
    for step in range(int(lanes.steps.max()) if len(state) else 0):
        live = step < lanes.steps
        slot = state & mask
        table = np.where(live, context[step], 0).astype(np.int64)
        e = np.searchsorted(tables.keys, table * PROB_SCALE + slot.astype(np.int64), side="right") - 1
        out[step] = e
        decoded = tables.freqs[e] * (state >> np.uint64(PROB_BITS)) + slot - tables.cum[e]
        state = np.where(live, decoded, state)
        need = live & (state < STATE_LOW)
        if not need.any():
            continue
        idx = np.flatnonzero(need)
        owner = lanes.stream[idx]
        rank = np.arange(len(idx)) - np.searchsorted(owner, owner)  # its place among its matrix's lanes this step
        where = pointer[owner] + rank
        short = where >= end[owner]
        if short.any():
            raise RansError(int(owner[np.argmax(short)]), "the rANS stream runs out of words (truncated or damaged)")
        state[idx] = (state[idx] << WORD_BITS) | words[where]
        pointer += np.bincount(owner, minlength=len(models))
    results = []
    for i, (model, (n, k)) in enumerate(zip(models, shapes)):
        lo, w = int(lanes.first[i]), int(lanes.width[i])
        if pointer[i] != end[i] or (state[lo: lo + w] != STATE_LOW).any():
            raise RansError(i, f"the rANS stream does not end where it began ({int(end[i] - pointer[i])} words "
                               "left unread): damaged")
        if not w:
            results.append(np.full((n, k), model.low, dtype=np.int64))
            continue
        e = out[:, lo: lo + w].reshape(-1)[: n * k].astype(np.int64)
        table = tables.first_table[i] + model.contexts()
        results.append((e - tables.table_start[table] + model.low).reshape(n, k))
    return results
