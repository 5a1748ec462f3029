"""The tgolf model file: a documented binary layout that loads without pickle or any code execution.

Layout (all integers little-endian):

    offset 0    8 bytes   magic b"TGOLFMDL"
    offset 8    u32       format version (2; 3 when a tensor has a low-rank correction; 4 when codes are
                          rANS-coded; version 1 files still load, see below)
    offset 12   u64       H = header length in bytes
    offset 20   H bytes   header: UTF-8 JSON object
    offset 20+H           payload: raw buffers, back to back, exactly ``payload_bytes`` long, to the end of the file

Header keys: ``format`` ("tgolf-model"), ``config`` (the tgolf Config as a dict), ``meta`` (free-form dict),
``payload_bytes`` and ``tensors``, a list of entries in state order:

    {"name": str, "scheme": str, "shape": [int, ...], "group_size": int | null, "packing": str,
     "dtype": str (raw only), "codes": [offset, length], "scales": [offset, length],
     "scales_coding": str}                                                            # quantized schemes
     or "data": [offset, length]                                                      # fp16, fp32, raw

An int matrix's entry may also hold ``"correction": {"up": entry, "down": entry}`` (version 3): two int-scheme
entries of the same layout (names, ``shape`` [r, N] and [r, K], codes and scales in the same sections), and the
reloaded matrix is ``codes · scales + upᵀ · down`` (tgolf.export.lowrank).

Offsets are relative to the payload start. Buffers:
  * ``data``: fp16 / fp32 / the raw dtype's bytes, C order.
  * ``scales`` [N, G] in C order, by ``scales_coding``:
      - "fp16": fp16 values, 2 bytes each;
      - "adaptive": ``pack_fp16_adaptive`` of the fp16 values (tgolf.export.packing: buckets of bit patterns,
        adaptively arithmetic-coded), a variable length checked by decoding it exactly. The writer uses it for
        ternary tensors when it is shorter than fp16 (whenever a tensor's scales cluster; measured 7.2-7.7 bits a
        scale for absmean scales of N(0, 0.02) rows, 9.4-10.1 after 400 AdamW steps of a tiny model) and fp16
        otherwise; integer schemes keep fp16 scales.
  * ``codes`` [N, K] flattened in C order, by ``packing`` (see tgolf.export.packing):
      - "int8":  one two's-complement byte per code,
      - "bits4": ``pack_bits(codes, 4)``, two codes per byte,
      - "trits": ``pack_trits(codes)``, 959 ternary codes per 190 bytes (1.58498 bits a code), written for ternary,
      - "base3": ``pack_base3(codes)``, five ternary codes per byte (1.6 bits), read for ternary (version 1);
      - "rans":  codes entropy-coded with histograms of the matrix's own codes, one per group of rows and columns
        (tgolf.export.rans), a variable length checked by decoding it exactly; written when the writer is asked
        for it (version 4; write_artifact's default): for every int4..int8 matrix, and for a ternary one when it
        is shorter than "trits" (its zeros are not a third everywhere: measured 1.43-1.53 bits a code on the MLP
        output projections of a small trained model, 1.58-1.59 on its other matrices, which stay "trits").
    Measured choice (2.1M weights: four 1024×512 matrices of N(0, 1) times a per-row factor U(0.5, 1.5),
    per-row quantize_weight with the baseline clip; ternary by round(w / mean|w|) per row; the smallest output
    of zlib-9 / lzma-9e / brotli-11 / zstd-22, in bits per weight): int6 5.348 as int8 bytes vs 5.693
    bit-packed; int5 4.306 vs 4.819; int7 6.366 vs 7.000; int8 equal (7.376); int4 3.221 vs 3.194 bit-packed;
    ternary (31% zeros) 1.654 as int8 bytes, 1.595 2-bit, 1.587 base-3. Byte-aligned codes let the entropy
    coders see whole symbols; 6- and 5-bit packing splits them across bytes and costs more than it saves.
    So, without the entropy coder: int5..int8 → "int8", int4 → "bits4"; ternary → base 3, now in 959-code blocks
    ("trits"): 1.58498 bits a code before any compressor, which none of the four shrinks further
    (python -m tgolf.export.measure_ternary).
    The payload holds all codes, then all scales, then all float data, compressed as one stream: compressing
    those three sections separately measured no smaller (brotli-11 on a baseline-shaped int6 model with
    N(0, 0.02) matrices: 11,417,970 bytes split vs 11,413,293 whole).

Version 1 (before "trits" and "adaptive") had no ``scales_coding`` field: its scales are fp16 and its ternary codes
"base3"; such files load unchanged. A version-1 reader refuses version-2 files by their version number. Version 3
only adds ``correction``, and version 4 the "rans" packing; the writer uses each only for files that need it, so
other files stay as they were.

Loading checks the magic, version, header JSON, every field of every entry, each buffer's exact length for its
shape and packing (an adaptive scales buffer: that it decodes to exactly N×G values and ends where its span
ends), that buffers lie inside the payload without overlapping, and that the file ends where the payload ends;
any failure raises FormatError naming the field or tensor.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any, Mapping

import numpy as np
import torch

from tgolf.export.packing import (pack_bits, pack_fp16_adaptive, pack_trits, packed_base3_length, packed_bits_length,
                                  packed_trits_length, unpack_base3, unpack_bits, unpack_fp16_adaptive, unpack_trits)
from tgolf.export.quantize import QuantTensor, code_range, num_groups, scheme_bits

MAGIC = b"TGOLFMDL"
VERSION = 4  # the newest version: written when codes are rANS-coded; else 3 when a tensor has a correction; else 2
READABLE_VERSIONS = (1, 2, 3, 4)
FORMAT_NAME = "tgolf-model"
_PREFIX = struct.Struct("<8sIQ")
_RAW_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)}
_FLOAT_SCHEMES = {"fp16": torch.float16, "fp32": torch.float32}


class FormatError(ValueError):
    """The bytes are not a valid tgolf model file; the message names what is wrong."""


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("tgolf model files are little-endian; this machine is big-endian")


def code_packing(scheme: str, entropy_code: bool = False) -> str:
    """How the writer stores the codes of a quantized scheme (the measured choice in the module docstring)."""
    if entropy_code:
        return "rans"
    if scheme == "ternary":
        return "trits"
    return "bits4" if scheme_bits(scheme) == 4 else "int8"


def _readable_packings(scheme: str, version: int) -> tuple[str, ...]:
    if scheme == "ternary":
        written = ("base3",) if version == 1 else ("trits", "base3")
    else:
        written = (code_packing(scheme),)
    return written + (("rans",) if version >= 4 else ())


def quantized_parts(tensors: Mapping[str, QuantTensor]) -> dict[str, QuantTensor]:
    """Every tensor with codes and the two parts of its low-rank correction, by the names the file gives them."""
    parts = {}
    for name, qt in tensors.items():
        for suffix, part in (("", qt), *zip((" correction up", " correction down"), qt.correction or ())):
            if part.codes is not None:
                parts[name + suffix] = part
    return parts


def _rans_coded(tensors: Mapping[str, QuantTensor]) -> dict[int, bytes]:
    """The rANS buffers of the tensors' codes (corrections included), coded together, by id of the tensor: every
    int tensor's, and a ternary tensor's where it is shorter than its "trits" (which no compressor shrinks)."""
    from tgolf.export.rans import rans_encode

    parts = list(quantized_parts(tensors).values())
    return {id(qt): buf for qt, buf in zip(parts, rans_encode([qt.codes.numpy() for qt in parts]))
            if qt.scheme != "ternary" or len(buf) < packed_trits_length(qt.numel)}


def _codes_length(packing: str, n: int) -> int:
    if packing == "trits":
        return packed_trits_length(n)
    if packing == "base3":
        return packed_base3_length(n)
    if packing == "bits4":
        return packed_bits_length(n, 4)
    return n


def _pack_codes(codes: torch.Tensor, packing: str) -> bytes:
    if packing == "trits":
        return pack_trits(codes).numpy().tobytes()
    if packing == "bits4":
        return pack_bits(codes, 4).numpy().tobytes()
    return codes.contiguous().numpy().tobytes()


def _unpack_codes(buf: bytes, packing: str, n: int) -> torch.Tensor:
    if packing == "trits":
        return unpack_trits(buf, n)
    if packing == "base3":
        return unpack_base3(buf, n)
    if packing == "bits4":
        return unpack_bits(buf, 4, n)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.int8).copy())


def _pack_scales(scheme: str, scales: torch.Tensor) -> tuple[str, bytes]:
    """(scales_coding, bytes): the adaptive code for ternary scales when it is shorter, else fp16."""
    plain = _tensor_bytes(scales.to(torch.float16))
    if scheme == "ternary":
        coded = pack_fp16_adaptive(scales.to(torch.float16))
        if len(coded) < len(plain):
            return "adaptive", coded
    return "fp16", plain


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_from_bytes(buf: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf:  # an empty numpy array has stride 0, which a dtype view refuses
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy()).view(dtype).reshape(shape)


def serialize(tensors: Mapping[str, QuantTensor], config: Mapping[str, Any],
              meta: Mapping[str, Any] | None = None, *, entropy_code: bool = False) -> bytes:
    """The model file's bytes for ``tensors`` (from quantize_model) and the run's config dict; ``entropy_code``
    stores the int schemes' codes rANS-coded ("rans" packing, a version 4 file)."""
    _require_little_endian()
    sections: dict[str, list[tuple[dict, str, bytes]]] = {"codes": [], "scales": [], "data": []}
    coded = _rans_coded(tensors) if entropy_code else {}
    entries = [_entry(name, qt, sections, coded) for name, qt in tensors.items()]
    offset, chunks = 0, []
    for kind in ("codes", "scales", "data"):
        for entry, key, buf in sections[kind]:
            entry[key] = [offset, len(buf)]
            chunks.append(buf)
            offset += len(buf)
    header = {"format": FORMAT_NAME, "config": dict(config), "meta": dict(meta or {}), "payload_bytes": offset,
              "tensors": entries}
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    version = 4 if coded else 3 if any(qt.correction is not None for qt in tensors.values()) else 2
    return _PREFIX.pack(MAGIC, version, len(header_bytes)) + header_bytes + b"".join(chunks)


def _entry(name: str, qt: QuantTensor, sections: dict[str, list[tuple[dict, str, bytes]]],
           coded: Mapping[int, bytes]) -> dict[str, Any]:
    """The header entry of one tensor; its buffers are queued in ``sections`` (their spans are set later).
    ``coded`` holds the rANS buffers of the tensors whose codes are entropy-coded, by id."""
    entry: dict[str, Any] = {"name": name, "scheme": qt.scheme, "shape": list(qt.shape), "group_size": qt.group_size}
    if qt.codes is not None:
        entry["packing"] = code_packing(qt.scheme, id(qt) in coded)
        entry["scales_coding"], scale_bytes = _pack_scales(qt.scheme, qt.scales)
        code_bytes = coded[id(qt)] if id(qt) in coded else _pack_codes(qt.codes, entry["packing"])
        sections["codes"].append((entry, "codes", code_bytes))
        sections["scales"].append((entry, "scales", scale_bytes))
        if qt.correction is not None:
            up, down = qt.correction
            entry["correction"] = {"up": _entry(f"{name} correction up", up, sections, coded),
                                   "down": _entry(f"{name} correction down", down, sections, coded)}
        return entry
    entry["packing"] = "none"
    if qt.scheme == "raw":
        entry["dtype"] = str(qt.data.dtype).removeprefix("torch.")
        data = qt.data
    else:
        data = qt.data.to(_FLOAT_SCHEMES[qt.scheme])
    sections["data"].append((entry, "data", _tensor_bytes(data)))
    return entry


def _get(entry: Mapping[str, Any], key: str, kinds: type, where: str) -> Any:
    if key not in entry:
        raise FormatError(f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is int):
        raise FormatError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _span(entry: Mapping[str, Any], key: str, expected: int | None, payload_bytes: int,
          where: str) -> tuple[int, int]:
    """[offset, length] of a buffer, checked against the payload and (unless None) the expected length."""
    span = _get(entry, key, list, where)
    if len(span) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in span):
        raise FormatError(f"{where}: field {key!r} must be [offset, length] with non-negative integers, got {span}")
    start, length = span
    if expected is not None and length != expected:
        raise FormatError(f"{where}: field {key!r} length {length} bytes, expected {expected} for its shape")
    if start + length > payload_bytes:
        raise FormatError(f"{where}: field {key!r} [{start}, {start + length}) runs past the payload "
                          f"({payload_bytes} bytes)")
    return start, length


def _parse_header(blob: bytes) -> tuple[dict[str, Any], int, int]:
    if len(blob) < _PREFIX.size:
        raise FormatError(f"model file: {len(blob)} bytes is too short for the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise FormatError(f"model file: bad magic {magic!r}, expected {MAGIC!r}")
    if version not in READABLE_VERSIONS:
        raise FormatError(f"model file: unsupported version {version}; this tgolf reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    header_end = _PREFIX.size + header_len
    if header_end > len(blob):
        raise FormatError(f"model file: header length {header_len} runs past the end of the file "
                          f"({len(blob)} bytes): truncated header")
    try:
        header = json.loads(bytes(blob[_PREFIX.size: header_end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"model file: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError("model file: header must be a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise FormatError(f"model file: header field 'format' is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    _get(header, "config", dict, "header")
    _get(header, "meta", dict, "header")
    _get(header, "tensors", list, "header")
    payload_bytes = _get(header, "payload_bytes", int, "header")
    if header_end + payload_bytes != len(blob):
        raise FormatError(f"model file: header field 'payload_bytes' = {payload_bytes} but the file holds "
                          f"{len(blob) - header_end} bytes after the header")
    return header, header_end, version


def _entries_with_corrections(entries: list[Any]) -> list[dict[str, Any]]:
    """The header's tensor entries and the parts of their corrections, as far as they are JSON objects."""
    found = []
    for entry in entries:
        if isinstance(entry, dict):
            found.append(entry)
            correction = entry.get("correction")
            if isinstance(correction, dict):
                found.extend(part for part in (correction.get("up"), correction.get("down")) if isinstance(part, dict))
    return found


def _rans_decoded(entries: list[Any], payload: memoryview, payload_bytes: int) -> dict[int, torch.Tensor]:
    """The codes of every "rans"-packed entry, decoded together (by id of the entry). Entries too malformed to
    decode are left to _parse_entry, which names what is wrong with them."""
    from tgolf.export.rans import RansError, rans_decode

    pending: list[tuple[dict[str, Any], str, bytes, tuple[int, int]]] = []
    for entry in _entries_with_corrections(entries):
        shape = entry.get("shape")
        if entry.get("packing") != "rans" or not isinstance(shape, list) or len(shape) != 2 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            continue
        where = f"tensor {entry.get('name')!r}"
        start, length = _span(entry, "codes", None, payload_bytes, where)
        pending.append((entry, where, bytes(payload[start: start + length]), (shape[0], shape[1])))
    try:
        codes = rans_decode([buf for _, _, buf, _ in pending], [shape for *_, shape in pending])
    except RansError as exc:
        raise FormatError(f"{pending[exc.stream][1]}: field 'codes': {exc}") from None
    # int64: _parse_entry checks the range of the scheme before the codes become int8
    return {id(entry): torch.from_numpy(c.reshape(-1)) for (entry, *_), c in zip(pending, codes)}


def _parse_entry(entry: Any, index: int, payload: memoryview, payload_bytes: int,
                 spans: list[tuple[int, int, str]], version: int,
                 decoded: Mapping[int, torch.Tensor]) -> tuple[str, QuantTensor]:
    if not isinstance(entry, dict):
        raise FormatError(f"tensor #{index}: entry must be a JSON object")
    name = _get(entry, "name", str, f"tensor #{index}")
    where = f"tensor {name!r}"
    scheme = _get(entry, "scheme", str, where)
    try:
        bits = scheme_bits(scheme)
    except ValueError as exc:
        raise FormatError(f"{where}: field 'scheme': {exc}") from None
    shape = _get(entry, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FormatError(f"{where}: field 'shape' must list non-negative integers, got {shape}")
    shape = tuple(shape)
    group_size = entry.get("group_size")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0):
        raise FormatError(f"{where}: field 'group_size' must be null or a positive integer, got {group_size!r}")
    packing = _get(entry, "packing", str, where)

    def take(key: str, expected: int | None) -> bytes:
        start, length = _span(entry, key, expected, payload_bytes, where)
        spans.append((start, length, f"{where} {key}"))
        return bytes(payload[start: start + length])

    numel = math.prod(shape)
    if "correction" in entry and not scheme.startswith("int"):
        raise FormatError(f"{where}: field 'correction' is only allowed on int schemes, not {scheme!r}")
    if bits is None:
        if packing != "none":
            raise FormatError(f"{where}: field 'packing' is {packing!r}, expected 'none' for scheme {scheme!r}")
        if scheme == "raw":
            dtype_name = _get(entry, "dtype", str, where)
            if dtype_name not in _RAW_DTYPES:
                raise FormatError(f"{where}: field 'dtype' {dtype_name!r} is not one of {sorted(_RAW_DTYPES)}")
            dtype = _RAW_DTYPES[dtype_name]
        else:
            dtype = _FLOAT_SCHEMES[scheme]
        data = _tensor_from_bytes(take("data", numel * dtype.itemsize), dtype, shape)
        return name, QuantTensor(scheme, shape, data=data)

    if len(shape) != 2:
        raise FormatError(f"{where}: field 'shape' must be 2-D [N, K] for scheme {scheme!r}, got {list(shape)}")
    packings = _readable_packings(scheme, version)
    if packing not in packings:
        raise FormatError(f"{where}: field 'packing' is {packing!r}, expected {' or '.join(map(repr, packings))} "
                          f"for scheme {scheme!r} in a version {version} file")
    scales_coding = "fp16" if version == 1 else _get(entry, "scales_coding", str, where)
    if scales_coding not in ("fp16", "adaptive"):
        raise FormatError(f"{where}: field 'scales_coding' is {scales_coding!r}, expected 'fp16' or 'adaptive'")
    n, k = shape
    if packing == "rans":
        take("codes", None)
        codes = decoded[id(entry)]
    else:
        code_bytes = take("codes", _codes_length(packing, numel))
        try:
            codes = _unpack_codes(code_bytes, packing, numel)
        except ValueError as exc:
            raise FormatError(f"{where}: field 'codes': {exc}") from None
    low, high = code_range(scheme)
    if numel and (int(codes.min()) < low or int(codes.max()) > high):
        raise FormatError(f"{where}: field 'codes' holds values outside [{low}, {high}] for scheme {scheme!r}")
    groups = num_groups(k, group_size)
    if scales_coding == "fp16":
        scales = _tensor_from_bytes(take("scales", n * groups * 2), torch.float16, (n, groups)).float()
    else:
        scale_bytes = take("scales", None)
        try:
            scales = unpack_fp16_adaptive(scale_bytes, n * groups).reshape(n, groups).float()
        except ValueError as exc:
            raise FormatError(f"{where}: field 'scales': {exc}") from None
    if not bool(torch.isfinite(scales).all()):
        raise FormatError(f"{where}: field 'scales' holds NaN or inf")
    correction = None
    if "correction" in entry:
        correction = _parse_correction(entry, where, shape, payload, payload_bytes, spans, version, decoded)
    return name, QuantTensor(scheme, shape, codes=codes.to(torch.int8).reshape(n, k), scales=scales,
                             group_size=group_size, correction=correction)


def _parse_correction(entry: Mapping[str, Any], where: str, shape: tuple[int, ...], payload: memoryview,
                      payload_bytes: int, spans: list[tuple[int, int, str]], version: int,
                      decoded: Mapping[int, torch.Tensor]) -> tuple[QuantTensor, QuantTensor]:
    """An int matrix's (up [r, N], down [r, K]) low-rank correction, every field checked."""
    if version < 3:
        raise FormatError(f"{where}: field 'correction' needs a version 3 file, this one is version {version}")
    correction = _get(entry, "correction", dict, where)
    parts = []
    for key, width in (("up", shape[0]), ("down", shape[1])):
        part_where = f"{where} correction {key}"
        sub = _get(correction, key, dict, f"{where} correction")
        _get(sub, "name", str, part_where)  # checked here: _parse_entry would name it by an index it does not have
        _, part = _parse_entry(sub, 0, payload, payload_bytes, spans, version, decoded)
        if not part.scheme.startswith("int") or part.group_size is not None or part.correction is not None:
            raise FormatError(f"{part_where}: must be an int4..int8 matrix with per-row scales and no correction "
                              f"of its own")
        if len(part.shape) != 2 or part.shape[1] != width or part.shape[0] < 1:
            raise FormatError(f"{part_where}: field 'shape' is {list(part.shape)}, expected [r, {width}] with r >= 1")
        parts.append(part)
    up, down = parts
    if up.shape[0] != down.shape[0]:
        raise FormatError(f"{where}: correction ranks differ: up has {up.shape[0]} rows, down {down.shape[0]}")
    return up, down


def deserialize(blob: bytes | bytearray | memoryview) -> tuple[dict[str, QuantTensor], dict[str, Any],
                                                                dict[str, Any]]:
    """(tensors by name in file order, config dict, meta dict) from a model file's bytes; FormatError if invalid."""
    _require_little_endian()
    header, header_end, version = _parse_header(blob)
    payload = memoryview(blob)[header_end:]
    payload_bytes = header["payload_bytes"]
    tensors: dict[str, QuantTensor] = {}
    spans: list[tuple[int, int, str]] = []
    decoded = _rans_decoded(header["tensors"], payload, payload_bytes) if version >= 4 else {}
    for index, entry in enumerate(header["tensors"]):
        name, qt = _parse_entry(entry, index, payload, payload_bytes, spans, version, decoded)
        if name in tensors:
            raise FormatError(f"tensor {name!r}: the name appears twice")
        tensors[name] = qt
    spans.sort()
    for (start_a, length_a, what_a), (start_b, _, what_b) in zip(spans, spans[1:]):
        if start_a + length_a > start_b:
            raise FormatError(f"model file: buffers overlap: {what_a} and {what_b}")
    return tensors, header["config"], header["meta"]
