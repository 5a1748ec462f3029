"""tgolf.export.rans: the interleaved rANS coder of quantization codes, and its "rans" packing in the model file."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from tgolf.export.format import MAGIC, FormatError, deserialize, serialize
from tgolf.export.quantize import QuantTensor, quantize_rows
from tgolf.export.rans import GROUP_BITS, PROB_SCALE, STEPS, RansError, lanes_for, rans_decode, rans_encode


def _entropy_bits(codes: np.ndarray) -> float:
    counts = np.unique(codes, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...], std: float | np.ndarray = 2.4) -> np.ndarray:
    return np.clip(np.round(rng.normal(0, 1, size=shape) * std), -31, 31).astype(np.int64)


def _matrices(rng: np.random.Generator) -> list[np.ndarray]:
    return [
        np.zeros((0, 5), dtype=np.int64),                  # no codes
        np.array([[5]]),                                   # one code
        np.full((10, 100), -3),                            # a one-code alphabet: no lanes, no words
        rng.integers(-7, 8, size=(1, STEPS - 1)),          # one lane, its last step partial
        rng.integers(-7, 8, size=(128, 128)),              # exactly one full lane
        rng.integers(-7, 8, size=(1, STEPS + 1)),          # two lanes of unequal length
        _gaussian(rng, (7, 7022)),                         # four lanes, int6-like codes
        np.array([[-127, 127] * 50 + [0]]),                # int8's ends, nothing between
        np.concatenate([np.zeros(200_000, np.int64), [31]]).reshape(1, -1),  # one outlier: the frequency floor
        _gaussian(rng, (300, 257), np.linspace(0.3, 4.0, 257)),  # columns of different spread: column groups
        _gaussian(rng, (257, 300), np.linspace(0.3, 4.0, 257)[:, None]),  # and rows
    ]


def test_round_trip_together_and_alone():
    rng = np.random.default_rng(0)
    matrices = _matrices(rng)
    buffers = rans_encode(matrices)
    back = rans_decode(buffers, [m.shape for m in matrices])
    for m, b in zip(matrices, back):
        assert b.dtype == np.int64 and np.array_equal(b, m)
    for m, buf in zip(matrices, buffers):  # a matrix coded alone gives the same bytes: lanes do not interact
        assert rans_encode([m]) == [buf]
        assert np.array_equal(rans_decode([buf], [m.shape])[0], m)
    assert np.array_equal(rans_decode(rans_encode([np.arange(-3, 4)]), [(1, 7)])[0], [np.arange(-3, 4)])


def _head(buf: bytes) -> tuple[int, int, int, int]:
    low, size, row_bits, col_bits = struct.unpack_from("<hHBB", buf)
    return low, size + 1, row_bits, col_bits


def test_layout_and_size_close_to_the_entropy():
    rng = np.random.default_rng(1)
    codes = _gaussian(rng, (1, 200_003))
    (buf,) = rans_encode([codes])
    low, size, row_bits, col_bits = _head(buf)
    assert (low, size, row_bits, col_bits) == (int(codes.min()), int(codes.max() - codes.min() + 1), 0, 0)
    freqs = np.frombuffer(buf, "<u2", count=size, offset=6)
    assert freqs.sum() == PROB_SCALE and (freqs[np.bincount(codes.reshape(-1) - low) > 0] >= 1).all()
    lanes = lanes_for(codes.size)
    words_bytes = len(buf) - 6 - 2 * size - 8 * lanes
    assert lanes == 13 and words_bytes % 4 == 0
    # the words come within 0.3% of the order-0 entropy (plus about 32 bits of start state per lane)
    assert 8 * words_bytes <= _entropy_bits(codes) * 1.003 + 64 * lanes


@pytest.mark.parametrize("axis", [0, 1])
def test_groups_pay_where_rows_or_columns_differ_in_spread(axis: int):
    rng = np.random.default_rng(5)
    spread = np.linspace(0.3, 4.0, 512)
    codes = _gaussian(rng, (512, 512), spread[:, None] if axis == 0 else spread[None, :])
    (buf,) = rans_encode([codes])
    _, size, row_bits, col_bits = _head(buf)
    assert (row_bits, col_bits)[1 - axis] == 0 and (row_bits, col_bits)[axis] >= 2
    assert (row_bits, col_bits) in GROUP_BITS
    assert 8 * len(buf) < 0.93 * _entropy_bits(codes)  # well under what any order-0 coder can reach
    rows = np.frombuffer(buf, np.uint8, count=row_bits * 64, offset=6)
    if axis == 0:  # the row groups follow the spread: the first rows in low groups, the last in high ones
        ids = sum(np.unpackbits(rows[b * 64:(b + 1) * 64], bitorder="little").astype(int) << b
                  for b in range(row_bits))
        assert ids[:64].max() < ids[-64:].min() and ids[0] == 0 and ids[-1] == (1 << row_bits) - 1


def test_damaged_buffers_raise():
    rng = np.random.default_rng(2)
    codes = rng.integers(-15, 16, size=(2, STEPS + 5))
    (buf,) = rans_encode([codes])
    assert _head(buf)[2:] == (0, 0)
    flipped = bytearray(buf)
    flipped[-9] ^= 0x10  # a word in the middle of the stream
    cases = [
        (buf[:5], "shorter than"),
        (buf[:-4], "runs out of words|does not end"),
        (buf + b"\0\0\0\0", "does not end where it began"),
        (buf[:-1], "whole 4-byte words"),
        (buf[:6] + struct.pack("<H", 7) + buf[8:], "does not sum to"),  # the first frequency changed
        (buf[:4] + bytes([9, 0]) + buf[6:], "group bits"),
        (bytes(flipped), "does not end where it began|runs out of words"),
        (struct.pack("<hHBB", 3, 0, 0, 0) + b"\0", "one-code alphabet"),
    ]
    for index, (bad, pattern) in enumerate(cases):
        with pytest.raises(RansError, match=pattern) as info:  # on failure, `index` names the case
            rans_decode([rans_encode([np.arange(3)])[0], bad], [(1, 3), codes.shape])
        assert info.value.stream == 1


def test_too_wide_a_range_is_refused():
    with pytest.raises(ValueError, match="16-bit"):
        rans_encode([np.array([0, 1 << 17])])
    with pytest.raises(ValueError, match="2 buffers but 1 shapes"):
        rans_decode([b"", b""], [(1, 1)])


def _int_tensors() -> dict[str, QuantTensor]:
    torch.manual_seed(3)
    out = {}
    for bits in (4, 5, 6, 8):
        codes, scales = quantize_rows(torch.randn(37, 300), bits, 0.9999)
        out[f"int{bits}"] = QuantTensor(f"int{bits}", (37, 300), codes=codes, scales=scales.half().float())
    up, up_scales = quantize_rows(torch.randn(2, 37), 4, None)
    down, down_scales = quantize_rows(torch.randn(2, 300), 4, None)
    out["int6"].correction = (QuantTensor("int4", (2, 37), codes=up, scales=up_scales.half().float()),
                              QuantTensor("int4", (2, 300), codes=down, scales=down_scales.half().float()))
    out["zeros"] = QuantTensor("int6", (4, 5), codes=torch.zeros(4, 5, dtype=torch.int8), scales=torch.ones(4, 1))
    out["tern"] = QuantTensor("ternary", (3, 7), codes=torch.randint(-1, 2, (3, 7), dtype=torch.int8),
                              scales=torch.ones(3, 1))
    sparse = torch.randint(-1, 2, (64, 256), dtype=torch.int8) * (torch.rand(64, 256) < torch.linspace(0.1, 1, 256))
    out["tern_sparse"] = QuantTensor("ternary", (64, 256), codes=sparse.to(torch.int8), scales=torch.ones(64, 1))
    out["f16"] = QuantTensor("fp16", (3,), data=torch.randn(3).half())
    return out


def _split(blob: bytes) -> tuple[int, dict, bytes]:
    version, header_len = struct.unpack_from("<IQ", blob, 8)
    return version, json.loads(blob[20:20 + header_len]), blob[20 + header_len:]


def _join(version: int, header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<IQ", version, len(text)) + text + payload


def test_model_file_with_rans_codes_round_trips():
    tensors = _int_tensors()
    blob = serialize(tensors, {}, entropy_code=True)
    version, header, _ = _split(blob)
    packings = {e["name"]: e["packing"] for e in header["tensors"]}
    # a ternary matrix is rANS-coded only where that is shorter than "trits": here where its zeros vary by column
    assert version == 4 and packings == {"int4": "rans", "int5": "rans", "int6": "rans", "int8": "rans",
                                         "zeros": "rans", "tern": "trits", "tern_sparse": "rans", "f16": "none"}
    assert header["tensors"][2]["correction"]["up"]["packing"] == "rans"
    back = deserialize(blob)[0]
    for name, qt in tensors.items():
        got = back[name]
        for a, b in zip((qt, *(qt.correction or ())), (got, *(got.correction or ()))):
            for key in ("codes", "scales", "data"):
                x, y = getattr(a, key), getattr(b, key)
                assert (x is None) == (y is None) and (x is None or (x.dtype == y.dtype and torch.equal(x, y)))
    plain = serialize(tensors, {})
    assert _split(plain)[0] == 3 and len(blob) < len(plain)


def test_model_file_rans_errors_name_the_tensor():
    blob = serialize(_int_tensors(), {}, entropy_code=True)
    version, header, payload = _split(blob)
    entry = header["tensors"][1]  # int5
    start, length = entry["codes"]
    damaged = payload[:start + length - 4] + bytes(4 * [0xFF]) + payload[start + length:]
    with pytest.raises(FormatError, match="'int5': field 'codes': .*(does not end|runs out)"):
        deserialize(_join(version, header, damaged))
    with pytest.raises(FormatError, match="'int4'.*packing.*'rans'.*version 3"):
        deserialize(_join(3, header, payload))
    # a table whose codes lie outside the scheme's range decodes, and is then refused by that range
    header["tensors"][1]["scheme"] = "int4"
    with pytest.raises(FormatError, match="'int5'.*outside"):
        deserialize(_join(version, header, payload))


def test_rans_beats_the_compressors_on_gaussian_int6_codes():
    """The reason it exists, on codes like a trained matrix's: fewer bytes than brotli-11 over the code bytes."""
    brotli = pytest.importorskip("brotli")
    torch.manual_seed(4)
    codes, _ = quantize_rows(torch.randn(512, 512) * torch.empty(512, 1).uniform_(0.5, 1.5), 6, None,
                             clip_sigmas=12.85)
    (buf,) = rans_encode([codes.numpy()])
    assert len(buf) < 0.99 * len(brotli.compress(codes.numpy().tobytes(), quality=11))
    assert 8 * len(buf) < 1.01 * _entropy_bits(codes.numpy().reshape(-1)) + 8 * (4 + 2 * 64 + 8 * 16)
    assert math.isclose(8 * len(buf) / codes.numel(), 3.33, abs_tol=0.02)


def test_artifacts_with_and_without_the_coder_load_the_same_model_and_measure(tmp_path, capsys):
    from tests.test_export import SMALL, TINY, random_gpt, tiny_config
    from tgolf.export.artifact import load_artifact, write_artifact
    from tgolf.export.measure_codes import main as measure_main

    model = random_gpt()
    coded = write_artifact(tmp_path / "rans.tgz", model, tiny_config(), "int6", small_numel=SMALL)
    plain = write_artifact(tmp_path / "none.tgz", model, tiny_config(), "int6", small_numel=SMALL,
                           entropy_coder="none")
    with pytest.raises(ValueError, match="entropy_coder='zip'"):
        write_artifact(tmp_path / "bad.tgz", model, tiny_config(), "int6", entropy_coder="zip")
    assert coded.model_bytes != plain.model_bytes and not (tmp_path / "bad.tgz").exists()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_artifact(tmp_path / "rans.tgz")[0].logits(ids),
                           load_artifact(tmp_path / "none.tgz")[0].logits(ids))
    measure_main([str(tmp_path / "none.tgz"), "--json", str(tmp_path / "m.json")])
    (result,) = json.loads((tmp_path / "m.json").read_text())
    names = {r["tensor"] for r in result["matrices"]}
    assert "tok_emb.weight" in names and all(r["scheme"] == "int6" for r in result["matrices"])
    assert all(0 < r["entropy"] < 6 and r["rans"] > 0 and r["without"] > 0 for r in result["matrices"])
    assert set(result["model_bytes"]) == {"none", "rans"}
    assert "| smallest |" in capsys.readouterr().out


def test_measure_codes_on_a_ternary_model(tmp_path):
    from tests.test_export import SMALL, random_gpt, tiny_config
    from tgolf.export.artifact import write_artifact
    from tgolf.export.measure_codes import measure

    write_artifact(tmp_path / "t.tgz", random_gpt(linear="ternary"), tiny_config(linear="ternary"), "int8",
                   small_numel=SMALL)
    rows = {r["tensor"]: r for r in measure(tmp_path / "t.tgz")["matrices"]}
    ternary = [r for r in rows.values() if r["scheme"] == "ternary"]
    assert ternary and rows["tok_emb.weight"]["scheme"] == "int8"
    assert all(1.58 < r["without"] < 1.6 for r in ternary)  # "trits": 959 codes in 190 bytes, and a partial block
