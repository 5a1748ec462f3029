"""tgolf.export: quantization, packing, the model file format, compression, artifacts, budget and submission."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tgolf.config import Config
from tgolf.export import artifact as artifact_mod
from tgolf.export import quantize as quantize_mod
from tgolf.export.artifact import (ArtifactInfo, BudgetExceeded, check_budget, load_artifact, read_artifact,
                                   write_artifact)
from tgolf.export.codebytes import CodeBytes, count_code_bytes
from tgolf.export.compress import NAMES, compress, compress_all, decompress
from tgolf.export.format import MAGIC, VERSION, FormatError, deserialize, serialize
from tgolf.export.packing import (TRIT_BLOCK, TRIT_BLOCK_BYTES, pack_base3, pack_bits, pack_fp16_adaptive, pack_trits,
                                  packed_trits_length, unpack_base3, unpack_bits, unpack_fp16_adaptive, unpack_trits)
from tgolf.export.quantize import (BASELINE_CLIP_QUANTILE, CLIP_SEARCH_QUANTILES, QuantTensor, dequantize_model,
                                   part_schemes, quantize_model, quantize_rows)
from tgolf.export.submission import write_submission
from tgolf.model import build_model
from tgolf.ops.quant.reference import dequantize_weight, quantize_weight
from tgolf.ops.ternary.reference import quantize_ternary

TINY = dict(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=256)
SMALL = 1024  # small_numel for the tiny model: its matrices (2048+ elements) are quantized, vectors kept


def tiny_config(**overrides) -> Config:
    return Config(**{**TINY, **overrides})


def random_gpt(seed: int = 0, **overrides) -> nn.Module:
    """The tiny GPT with every parameter random (the GPT zero-inits its proj layers: a test must be able to fail)."""
    model = build_model(tiny_config(**overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (0.5 if p.dim() == 1 else 0.0))
    return model


def dense_reference(qtensors: dict[str, QuantTensor], **overrides) -> nn.Module:
    model = build_model(tiny_config(**overrides), linear="bf16")
    model.load_state_dict(dequantize_model(qtensors))
    return model.eval()


# --- quantization --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("int7", 7), ("int6", 6), ("int5", 5), ("int4", 4)])
def test_quantize_model_codes_exact(scheme, bits):
    model = random_gpt()
    q = quantize_model(model, scheme, small_numel=SMALL)
    state = model.state_dict()
    assert list(q) == list(state)
    for name, tensor in state.items():
        qt = q[name]
        if tensor.dim() == 2 and tensor.numel() > SMALL:
            codes, scales = quantize_weight(tensor, bits, clip_quantile=BASELINE_CLIP_QUANTILE)
            assert qt.scheme == scheme and qt.group_size is None
            assert torch.equal(qt.codes, codes) and torch.equal(qt.scales, scales)
            assert torch.equal(qt.dequantize(), dequantize_weight(codes, scales))
            assert int(qt.codes.abs().max()) <= (1 << (bits - 1)) - 1
        else:
            assert qt.scheme == "fp16" and torch.equal(qt.dequantize(), tensor.half().float())
    assert q["tok_emb.weight"].scheme == scheme  # the tied embedding is a large matrix


def test_quantize_model_small_tensors_and_errors():
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([1e5, 1.0, 2.0]))  # overflows fp16
    q = quantize_model(model, "int8")
    assert q["bias"].scheme == "fp32" and torch.equal(q["bias"].data, model.bias.detach())
    assert q["weight"].scheme == "fp16"
    assert all(qt.scheme == "fp32" for qt in quantize_model(model, "int8", small_dtype="fp32").values())
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'weight'.*NaN"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="scheme"):
        quantize_model(model, "int9")
    with pytest.raises(ValueError, match="small_dtype"):
        quantize_model(model, "int8", small_dtype="bf16")


def test_quantize_rows_chunked_equals_whole(monkeypatch):
    w = torch.randn(37, 29)
    whole = quantize_weight(w, 6, clip_quantile=BASELINE_CLIP_QUANTILE)
    monkeypatch.setattr(quantize_mod, "_QUANTILE_MAX_NUMEL", 100)  # 3 rows per chunk
    chunked = quantize_rows(w, 6, BASELINE_CLIP_QUANTILE)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


@pytest.mark.parametrize("scheme,mlp,expected", [
    ("int6", "", "66 65 55 54 44"), ("int6", "int5", "65 55 54 44"), ("int8", "int8", "88 87 77 76 66 65 55 54 44"),
    ("int4", "int6", "46 45 44"), ("int6", "int4", "64 54 44"), ("int4", "", "44")])
def test_fit_ladder_takes_a_bit_off_the_mlp_first(scheme, mlp, expected):
    from tgolf.export.fit import bits_ladder

    assert " ".join(a[3] + b[3] for a, b in bits_ladder(scheme, mlp)) == expected


def test_fit_keeps_the_first_export_under_the_limit(tmp_path):
    from tgolf.export.fit import write_fitting_artifact

    model, config, path = random_gpt(), tiny_config(), tmp_path / "m.tgz"
    sizes = {}
    for other, mlp in (("int6", "int6"), ("int6", "int5"), ("int5", "int5")):
        info = write_artifact(path, model, config, other, compressor="zlib", small_numel=SMALL, overwrite=True,
                              schemes=part_schemes(model, "int8", mlp), code=CodeBytes(total=0, files=()))
        sizes[other, mlp] = info.model_bytes
    assert sizes["int6", "int6"] > sizes["int6", "int5"] > sizes["int5", "int5"]
    lines: list[str] = []
    fit = dict(scheme="int6", mlp_scheme="", embed_scheme="int8", code_bytes=100, log=lines.append,
               compressor="zlib", small_numel=SMALL, code=CodeBytes(total=0, files=()))
    info, other, mlp = write_fitting_artifact(path, model, config, limit=sizes["int6", "int5"] + 100, **fit)
    assert (other, mlp, info.model_bytes) == ("int6", "int5", sizes["int6", "int5"]) and len(lines) == 1
    assert "int6 matrices with int6 MLP" in lines[0] and "over the" in lines[0]
    tensors, _, _ = read_artifact(path)  # the file on disk is the one that fit: int8 embedding, int5 MLP
    assert tensors["tok_emb.weight"].scheme == "int8" and tensors["blocks.0.mlp.fc.weight"].scheme == "int5"
    with pytest.raises(BudgetExceeded, match="even int4"):
        write_fitting_artifact(path, model, config, limit=1000, **fit)


@pytest.mark.parametrize("linear", ["qat6", "ternary"])
def test_fit_does_not_retry_layers_that_export_their_own_codes(tmp_path, linear):
    # QAT and ternary layers export the codes they trained with: no export scheme changes them, so the fit tries
    # once and says why it cannot shrink, instead of writing the same bytes down the whole ladder
    from tgolf.export.fit import write_fitting_artifact
    from tgolf.export.quantize import rounded_matrix_names

    model, config = random_gpt(linear=linear), tiny_config(linear=linear)
    assert rounded_matrix_names(model, SMALL) == ["tok_emb.weight"]
    lines: list[str] = []
    with pytest.raises(BudgetExceeded, match="no matrix but the embedding has bits to take away: QAT and ternary"):
        write_fitting_artifact(tmp_path / "m.tgz", model, config, scheme="int6", mlp_scheme="", embed_scheme="int8",
                               limit=1000, code_bytes=0, log=lines.append, compressor="zlib", small_numel=SMALL,
                               code=CodeBytes(total=0, files=()))
    assert len(lines) == 1  # one export, not one per rung of the ladder


def test_fit_steps_only_the_parts_that_have_rounded_matrices(tmp_path):
    # attention matrices small enough to stay float: only the MLP's bits step down, and each export differs
    from tgolf.export.fit import write_fitting_artifact
    from tgolf.export.quantize import mlp_matrix_names, rounded_matrix_names

    model, config = random_gpt(), tiny_config()
    small = max(t.numel() for n, t in model.state_dict().items() if ".attn." in n)
    assert set(rounded_matrix_names(model, small)) == {"tok_emb.weight", *mlp_matrix_names(model)}
    lines: list[str] = []
    with pytest.raises(BudgetExceeded, match="even int4"):
        write_fitting_artifact(tmp_path / "m.tgz", model, config, scheme="int6", mlp_scheme="", embed_scheme="int8",
                               limit=1000, code_bytes=0, log=lines.append, compressor="zlib", small_numel=small,
                               code=CodeBytes(total=0, files=()))
    assert [line.split(" give")[0] for line in lines] == [
        f"export fit: int6 matrices with int{b} MLP" for b in (6, 5, 4)]


def _filled(tmp_path, limit: int, lines: list[str], sigmas: float = 12.0, small_numel: int = SMALL):
    from tgolf.export.fill import write_filling_artifact

    model = random_gpt()
    return write_filling_artifact(tmp_path / "m.tgz", model, tiny_config(), scheme="int6",
                                  schemes=part_schemes(model, "int8", ""), sigmas=sigmas, embed_sigmas=20.0,
                                  limit=limit, code_bytes=100, log=lines.append, compressor="zlib",
                                  small_numel=small_numel, code=CodeBytes(total=0, files=()))


def test_fill_finds_the_sdclip_k_that_fills_the_limit(tmp_path):
    from tgolf.export.quantize import part_clip_sigmas

    model = random_gpt()
    base = write_artifact(tmp_path / "k12.tgz", model, tiny_config(), "int6", compressor="zlib", small_numel=SMALL,
                          schemes=part_schemes(model, "int8", ""), code=CodeBytes(total=0, files=()),
                          clip_sigmas=part_clip_sigmas(model, 12.0, 20.0, SMALL)).model_bytes
    for target in (0.97, 1.03):  # a limit under what K = 12 takes (a coarser K fits it), and one over (a finer K)
        limit, lines = int(base * target) + 100, []
        info, k = _filled(tmp_path / str(target), limit, lines)
        total = info.model_bytes + 100
        assert limit * 0.99 <= total <= limit and (k < 12.0) == (target > 1), lines
        assert lines[0].startswith(f"export fill: matrices' SDClip K=12 gives {base:,} B") and len(lines) <= 4
        tensors, _, meta = read_artifact(tmp_path / str(target) / "m.tgz")
        assert meta["clip_sigmas"]["blocks.0.mlp.fc.weight"] == k and meta["clip_sigmas"]["tok_emb.weight"] == 20.0
        assert tensors["tok_emb.weight"].scheme == "int8"
        assert sorted(p.name for p in (tmp_path / str(target)).iterdir()) == ["m.tgz"]  # no attempt left behind
    with pytest.raises(BudgetExceeded, match="even SDClip K=48"):
        _filled(tmp_path / "small", 2000, [])
    assert not list((tmp_path / "small").iterdir())
    lines = []  # every matrix small enough to stay float: one write, and the error says there is nothing to raise
    with pytest.raises(BudgetExceeded, match="no matrix but the embedding has an SDClip K"):
        _filled(tmp_path / "float", 2000, lines, small_numel=10**9)
    assert len(lines) == 1


def _row_errors(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (dequantize_weight(codes, scales) - w).square().sum(1)


@pytest.mark.parametrize("bits", [4, 6])
def test_clip_search_takes_each_rows_best_candidate(bits):
    torch.manual_seed(0)
    w = torch.randn(40, 4096)
    w[::4, :3] *= 8.0  # every 4th row has three outliers, which the full-range clip wastes the grid on
    codes, scales = quantize_rows(w, bits, None, CLIP_SEARCH_QUANTILES)
    chosen = _row_errors(w, codes, scales)
    candidates = torch.stack([_row_errors(w, *quantize_rows(w, bits, q)) for q in CLIP_SEARCH_QUANTILES])
    torch.testing.assert_close(chosen, candidates.min(0).values, rtol=0, atol=0)
    full_range = candidates[-1]
    assert bool((chosen[::4] < full_range[::4]).all())  # the outlier rows clip it
    base = quantize_rows(w, bits, BASELINE_CLIP_QUANTILE)
    assert all(torch.equal(a, b) for a, b in zip(quantize_rows(w, bits, None, [BASELINE_CLIP_QUANTILE]), base))


def test_clip_search_artifact_reloads_its_codes(tmp_path):
    model = random_gpt()
    path = tmp_path / "m.tgz"
    write_artifact(path, model, tiny_config(), "int6", small_numel=SMALL, clip_search=CLIP_SEARCH_QUANTILES)
    tensors, _, meta = read_artifact(path)
    assert meta["clip_search"] == list(CLIP_SEARCH_QUANTILES) and meta["clip_quantile"] is None
    expected = quantize_model(model, "int6", small_numel=SMALL, clip_search=CLIP_SEARCH_QUANTILES)
    for name, qt in expected.items():
        assert torch.equal(tensors[name].dequantize(), qt.dequantize()), name


def test_sdclip_scales_are_row_stds_over_qmax_uncapped():
    torch.manual_seed(0)
    w = torch.randn(8, 300) * torch.logspace(-2, 0, 8)[:, None]
    codes, scales = quantize_rows(w, 6, BASELINE_CLIP_QUANTILE, CLIP_SEARCH_QUANTILES, clip_sigmas=12.85)
    expected = (12.85 * w.std(dim=1, keepdim=True) / 31).to(torch.float16).float()  # the other clips unused
    assert torch.equal(scales, expected) and torch.equal(codes, torch.round(w / expected).clamp(-31, 31).to(torch.int8))
    assert bool((scales[:, 0] * 31 > w.abs().amax(1)).all())  # wider than the row: a coarser grid than absmax's
    assert codes.abs().max() < 31
    tight_codes, _ = quantize_rows(w, 6, None, clip_sigmas=1.0)  # one std: the tails clip at ±qmax
    assert bool((tight_codes.abs() == 31).any(1).all())
    with pytest.raises(ValueError, match="clip_sigmas=0"):
        quantize_rows(w, 6, None, clip_sigmas=0.0)


def test_sdclip_reaches_the_named_matrices_and_the_artifact(tmp_path):
    model = random_gpt()
    sigmas = quantize_mod.part_clip_sigmas(model, 12.85, 20.0, small_numel=SMALL)
    assert sigmas["tok_emb.weight"] == 20.0 and set(sigmas.values()) == {12.85, 20.0}
    write_artifact(tmp_path / "m.tgz", model, tiny_config(), "int6", small_numel=SMALL, clip_sigmas=sigmas)
    tensors, _, meta = read_artifact(tmp_path / "m.tgz")
    assert meta["clip_sigmas"] == sigmas
    state = model.state_dict()
    for name, k in sigmas.items():
        assert torch.equal(tensors[name].scales, quantize_rows(state[name], 6, None, clip_sigmas=k)[1]), name
    with pytest.raises(ValueError, match="clip_sigmas given for tensors the model does not have"):
        quantize_model(model, "int6", small_numel=SMALL, clip_sigmas={"nope.weight": 3.0})


# --- packing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_every_length(bits):
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for n in [*range(51), 100_003]:
        codes = torch.randint(low, high + 1, (n,), dtype=torch.int8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_base3_every_length():
    for n in [*range(51), 100_003]:
        codes = torch.randint(-1, 2, (n,), dtype=torch.int8)
        packed = pack_base3(codes)
        assert packed.numel() == (n + 4) // 5
        if n:
            assert int(packed.max()) < 243
        assert torch.equal(unpack_base3(packed, n), codes)


def test_packing_layout_is_the_documented_one():
    # 4-bit: codes 0, 1 → unsigned 8, 9 → low nibble first: 0x98
    assert pack_bits(torch.tensor([0, 1], dtype=torch.int8), 4).tolist() == [0x98]
    # base-3: digits 0,1,2,2,1 → 0 + 3 + 18 + 54 + 81
    assert pack_base3(torch.tensor([-1, 0, 1, 1, 0], dtype=torch.int8)).tolist() == [156]


def test_packing_bad_data_raises():
    codes = torch.randint(-16, 16, (23,), dtype=torch.int8)
    packed = pack_bits(codes, 5)
    with pytest.raises(ValueError, match="truncated"):
        unpack_bits(packed[:-1], 5, 23)
    with pytest.raises(ValueError, match="over-long"):
        unpack_bits(torch.cat([packed, packed[:1]]), 5, 23)
    corrupt = packed.clone()
    corrupt[-1] |= 0x80  # 23*5 = 115 bits: bit 7 of the last byte is padding
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(corrupt, 5, 23)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([16], dtype=torch.int8), 5)
    tern = pack_base3(torch.zeros(7, dtype=torch.int8))
    with pytest.raises(ValueError, match="truncated"):
        unpack_base3(tern[:1], 7)
    with pytest.raises(ValueError, match="over-long"):
        unpack_base3(torch.cat([tern, tern]), 7)
    with pytest.raises(ValueError, match="243"):
        unpack_base3(torch.tensor([250, 0], dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="padding"):
        unpack_base3(torch.tensor([0, 2 * 81], dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="ternary"):
        pack_base3(torch.tensor([2], dtype=torch.int8))


def _trits_number(codes: torch.Tensor) -> int:
    """The base-3 number of one block, digits c + 1 least significant first: the documented layout, by Python ints."""
    return sum((int(c) + 1) * 3 ** i for i, c in enumerate(codes.tolist()))


def test_pack_trits_every_length_and_layout():
    gen = torch.Generator().manual_seed(3)
    lengths = [*range(301), 957, 958, 959, 960, 1917, 1918, 1919, 5 * TRIT_BLOCK + 17, 100_003]
    for n in lengths:
        codes = torch.randint(-1, 2, (n,), dtype=torch.int8, generator=gen)
        packed = pack_trits(codes)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_trits_length(n)
        blocks = [codes[i: i + TRIT_BLOCK] for i in range(0, n, TRIT_BLOCK)]
        expected = b"".join(_trits_number(b).to_bytes(((3 ** b.numel() - 1).bit_length() + 7) // 8, "little")
                            for b in blocks[-2:])  # the last two blocks: a full one and a partial one
        assert packed.numpy().tobytes()[-len(expected):] == expected
        assert torch.equal(unpack_trits(packed, n), codes)
    assert (TRIT_BLOCK, TRIT_BLOCK_BYTES) == (959, 190) and packed_trits_length(TRIT_BLOCK) == 190
    assert 3 ** TRIT_BLOCK < 2 ** (8 * TRIT_BLOCK_BYTES) < 3 ** (TRIT_BLOCK + 1)
    assert pack_trits(torch.ones(959, dtype=torch.int8)).numpy().tobytes() == (3 ** 959 - 1).to_bytes(190, "little")
    assert pack_trits(torch.tensor([-1, 0, 1, 1, 0], dtype=torch.int8)).tolist() == [156]


def test_pack_trits_bad_data_raises():
    packed = pack_trits(torch.zeros(TRIT_BLOCK + 7, dtype=torch.int8))  # 190 + 2 bytes
    with pytest.raises(ValueError, match="truncated"):
        unpack_trits(packed[:-1], TRIT_BLOCK + 7)
    with pytest.raises(ValueError, match="over-long"):
        unpack_trits(torch.cat([packed, packed[:1]]), TRIT_BLOCK + 7)
    full = packed.clone()
    full[:190] = 255  # 2^1520 - 1 ≥ 3^959
    with pytest.raises(ValueError, match="block 0 .*3\\^959"):
        unpack_trits(full, TRIT_BLOCK + 7)
    tail = packed.clone()
    tail[-2:] = torch.tensor([0x6B, 0x08], dtype=torch.uint8)  # 0x086B = 2155 < 3^7 = 2187: valid, decodes to digits
    assert torch.equal(unpack_trits(tail, TRIT_BLOCK + 7)[-7:] + 1,
                       torch.tensor([(2155 // 3 ** i) % 3 for i in range(7)], dtype=torch.int8))
    tail[-2:] = torch.tensor([0x8B, 0x08], dtype=torch.uint8)  # 2187 = 3^7
    with pytest.raises(ValueError, match="block 1 .*3\\^7"):
        unpack_trits(tail, TRIT_BLOCK + 7)
    with pytest.raises(ValueError, match="ternary"):
        pack_trits(torch.tensor([0, -2], dtype=torch.int8))
    with pytest.raises(ValueError, match="integer"):
        pack_trits(torch.zeros(3))


def _fp16_bits(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.int16)


def test_adaptive_fp16_round_trip_any_values():
    gen = torch.Generator().manual_seed(4)
    for n in (0, 1, 2, 7, 300, 2047, 2048, 2049, 4100):
        cases = [(0.02 + 0.0005 * torch.randn(n, generator=gen)).half(),  # clustered: the scales' case
                 torch.randint(-32768, 32768, (n,), dtype=torch.int16, generator=gen).view(torch.float16),
                 torch.full((n,), 0.25, dtype=torch.float16),
                 (torch.randn(n, generator=gen) * 100).half()]
        for values in cases:
            data = pack_fp16_adaptive(values)
            assert torch.equal(_fp16_bits(unpack_fp16_adaptive(data, n)), _fp16_bits(values))
    clustered = (0.02 + 0.0005 * torch.randn(4096, generator=gen)).half()
    assert len(pack_fp16_adaptive(clustered)) * 8 / 4096 < 7.5  # σ ≈ 33 ulps: entropy ≈ 7.1 bits
    assert len(pack_fp16_adaptive(torch.full((4096,), 0.25, dtype=torch.float16))) < 20


def test_adaptive_fp16_bad_data_raises():
    values = (0.02 + 0.0005 * torch.randn(2100, generator=torch.Generator().manual_seed(5))).half()
    data = pack_fp16_adaptive(values)
    with pytest.raises(ValueError, match="truncated"):
        unpack_fp16_adaptive(data[:-1], 2100)
    with pytest.raises(ValueError, match="truncated"):
        unpack_fp16_adaptive(data[:3], 2100)
    with pytest.raises(ValueError, match="over-long"):
        unpack_fp16_adaptive(data + b"\0", 2100)
    with pytest.raises(ValueError, match="header"):
        unpack_fp16_adaptive(data[:2] + bytes([17]) + data[3:], 2100)
    first = int.from_bytes(data[5:7], "little")  # first segment: u16 length, then its state
    bigger = data[:5] + (first + 40).to_bytes(2, "little") + data[7: 7 + first] + b"\xff" * 40 + data[7 + first:]
    with pytest.raises(ValueError, match="state 0"):
        unpack_fp16_adaptive(bigger, 2100)
    with pytest.raises(ValueError, match="float16"):
        pack_fp16_adaptive(torch.zeros(3))


def test_ternary_bits_per_weight_with_scales():
    """Codes + scales of absmean-quantized N(0, 0.02) rows of 768: under 1.60 bits a weight (1.5943 measured).

    At 512 per row such scales cost ~7.5 bits each, 1.5997-1.6001 in all (their entropy floor), so no test there."""
    w = torch.randn(512, 768, generator=torch.Generator().manual_seed(6)) * 0.02
    codes, scales = quantize_ternary(w)
    blob = serialize({"w": QuantTensor("ternary", (512, 768), codes=codes, scales=scales)}, {})
    header, payload = _split(blob)
    (entry,) = header["tensors"]
    assert entry["packing"] == "trits" and entry["scales_coding"] == "adaptive"
    assert len(payload) * 8 / w.numel() < 1.60
    back = deserialize(blob)[0]["w"]
    assert torch.equal(back.codes, codes) and torch.equal(back.scales, scales)


# --- the model file format -----------------------------------------------------------------------------------


def every_scheme() -> dict[str, QuantTensor]:
    out = {
        "f16": QuantTensor("fp16", (5, 3), data=torch.randn(5, 3).half()),
        "f32": QuantTensor("fp32", (7,), data=torch.randn(7)),
        "empty": QuantTensor("fp16", (0,), data=torch.zeros(0, dtype=torch.float16)),
        "i64": QuantTensor("raw", (4,), data=torch.arange(4) - 2),
        "flag": QuantTensor("raw", (3,), data=torch.tensor([True, False, True])),
        "bf": QuantTensor("raw", (2, 2), data=torch.randn(2, 2).bfloat16()),
    }
    for bits in (8, 7, 6, 5, 4):
        codes, scales = quantize_weight(torch.randn(7, 13), bits)
        out[f"int{bits}"] = QuantTensor(f"int{bits}", (7, 13), codes=codes, scales=scales)
    codes, scales = quantize_weight(torch.randn(6, 11), 6, group_size=4)
    out["qat6g4"] = QuantTensor("qat6", (6, 11), codes=codes, scales=scales, group_size=4)
    tern = torch.randint(-1, 2, (9, 17), dtype=torch.int8)
    out["tern"] = QuantTensor("ternary", (9, 17), codes=tern, scales=torch.rand(9, 3).half().float(), group_size=8)
    codes, scales = quantize_ternary(torch.randn(40, 700) * 0.02)  # clustered scales: coded "adaptive"
    out["tern2"] = QuantTensor("ternary", (40, 700), codes=codes, scales=scales)
    out["tern1"] = QuantTensor("ternary", (1, 5), codes=tern[:1, :5], scales=torch.ones(1, 1))  # fp16 is shorter
    return out


def assert_same(a: QuantTensor, b: QuantTensor) -> None:
    assert (a.scheme, a.shape, a.group_size) == (b.scheme, b.shape, b.group_size)
    for key in ("data", "codes", "scales"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), key


def test_format_round_trip_every_scheme():
    tensors = every_scheme()
    blob = serialize(tensors, {"a": 1, "b": [1.5, "x"]}, {"note": "hi"})
    assert blob.startswith(MAGIC)
    back, config, meta = deserialize(blob)
    assert list(back) == list(tensors) and config == {"a": 1, "b": [1.5, "x"]} and meta == {"note": "hi"}
    for name in tensors:
        assert_same(tensors[name], back[name])
    codings = {e["name"]: (e["packing"], e.get("scales_coding")) for e in _split(blob)[0]["tensors"]}
    assert codings["tern2"] == ("trits", "adaptive") and codings["tern1"] == ("trits", "fp16")
    assert codings["int6"] == ("int8", "fp16")


def _split(blob: bytes) -> tuple[dict, bytes]:
    (header_len,) = struct.unpack_from("<Q", blob, 12)
    return json.loads(blob[20:20 + header_len]), blob[20 + header_len:]


def _join(header: dict, payload: bytes, version: int = VERSION) -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<IQ", version, len(text)) + text + payload


def _with_entry(blob: bytes, name: str, **changes) -> bytes:
    header, payload = _split(blob)
    for entry in header["tensors"]:
        if entry["name"] == name:
            entry.update(changes)
    return _join(header, payload)


def test_format_corruption_gives_clear_errors():
    blob = serialize(every_scheme(), {})
    header, payload = _split(blob)
    entries = {e["name"]: e for e in header["tensors"]}
    off, length = entries["int6"]["codes"]
    cases = [
        (b"XXXXXXXX" + blob[8:], "magic"),
        (blob[:8] + struct.pack("<I", VERSION + 1) + blob[12:], f"version {VERSION + 1}"),
        (blob[:12] + struct.pack("<Q", len(blob)) + blob[20:], "truncated header"),
        (blob[:10], "too short"),
        (_join(header, payload)[:-1], "payload_bytes"),
        (_join(header, payload) + b"\0", "payload_bytes"),
        (blob[:20] + b"\xff" + blob[21:], "UTF-8 JSON"),
        (blob[:20] + b"[" + blob[21:], "JSON"),
        (_with_entry(blob, "int6", codes=[len(payload) - 2, length]), "'int6'.*runs past the payload"),
        (_with_entry(blob, "int6", codes=[off, length - 1]), "'int6'.*'codes' length"),
        (_with_entry(blob, "int6", codes=[-1, length]), "'int6'.*non-negative"),
        (_with_entry(blob, "int8", codes=entries["int7"]["codes"]), "overlap"),  # same length, codes in range
        (_with_entry(blob, "f16", scheme="int9"), "'f16'.*scheme"),
        (_with_entry(blob, "f16", shape=[5, -3]), "'f16'.*shape"),
        (_with_entry(blob, "int6", packing="bits6"), "'int6'.*packing"),
        (_with_entry(blob, "bf", dtype="complex64"), "'bf'.*dtype"),
        (_with_entry(blob, "tern", group_size=0), "'tern'.*group_size"),
        (_with_entry(blob, "tern", packing="base5"), "'tern'.*packing"),
        (_with_entry(blob, "tern2", scales_coding="zstd"), "'tern2'.*scales_coding"),
        (_with_entry(blob, "tern2", scales=[entries["tern2"]["scales"][0], entries["tern2"]["scales"][1] - 1]),
         "'tern2'.*'scales'.*truncated"),
        (_join(header, payload, version=1), "'tern'.*packing"),  # "trits" did not exist in version 1
    ]
    del entries["f32"]["data"]
    cases.append((_join(header, payload), "'f32'.*missing field 'data'"))
    for index, (bad, pattern) in enumerate(cases):
        with pytest.raises(FormatError, match=pattern):  # on failure, `index` names the case
            deserialize(bad)


def test_format_version_1_files_still_load():
    """Version 1: no scales_coding field, fp16 scales, ternary codes five per byte."""
    codes = torch.randint(-1, 2, (3, 11), dtype=torch.int8, generator=torch.Generator().manual_seed(7))
    scales = torch.rand(3, 1).half()
    packed = pack_base3(codes).numpy().tobytes()
    entry = {"name": "t", "scheme": "ternary", "shape": [3, 11], "group_size": None, "packing": "base3",
             "codes": [0, len(packed)], "scales": [len(packed), 6]}
    header = {"format": "tgolf-model", "config": {}, "meta": {}, "payload_bytes": len(packed) + 6, "tensors": [entry]}
    back = deserialize(_join(header, packed + scales.numpy().tobytes(), version=1))[0]["t"]
    assert torch.equal(back.codes, codes) and torch.equal(back.scales, scales.float())


def test_format_rejects_codes_out_of_range():
    codes = torch.full((2, 3), 100, dtype=torch.int8)  # int8 bytes, but the scheme says int5 (|code| <= 15)
    blob = serialize({"w": QuantTensor("int5", (2, 3), codes=codes, scales=torch.ones(2, 1))}, {})
    with pytest.raises(FormatError, match="'w'.*outside"):
        deserialize(blob)


# --- compression ---------------------------------------------------------------------------------------------


def test_compress_best_is_smallest_and_round_trips():
    data = serialize(quantize_model(random_gpt(), "int6", small_numel=SMALL), {})
    every = compress_all(data)
    best, name, sizes = compress(data, "best")
    assert len(best) == min(len(v) for v in every.values()) and sizes == {k: len(v) for k, v in every.items()}
    assert every[name] == best
    for method in NAMES:
        container, used, _ = compress(data, method)
        assert used == method and decompress(container) == (data, method)
    with pytest.raises(ValueError, match="magic"):
        decompress(b"NOPE" + best[4:])
    with pytest.raises(ValueError, match="unknown compressor"):
        decompress(b"TGZ1\x03abc" + best[9:])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        decompress(best[: len(best) // 2])
    with pytest.raises(ValueError, match="compressor"):
        compress(data, "gzip")


# --- artifacts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int7", "int6", "int5", "int4"])
def test_roundtrip_logits_equal_quantized_model(tmp_path, scheme):
    torch.manual_seed(1)
    model = random_gpt()
    reference = dense_reference(quantize_model(model, scheme, small_numel=SMALL))
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    path = tmp_path / "model.tgz"
    info = write_artifact(path, model, tiny_config(), scheme, small_numel=SMALL)
    loaded, config = load_artifact(path)
    assert config == tiny_config()
    with torch.no_grad():
        expected, got = reference.logits(ids), loaded.logits(ids)
        assert torch.equal(got, expected)
        assert not torch.equal(got, model.logits(ids))  # quantization did change the model
    assert info.model_bytes == path.stat().st_size and info.artifact_bytes == info.model_bytes + info.code_bytes
    assert info.compressed_sizes[info.compressor] == info.model_bytes == min(info.compressed_sizes.values())
    assert info.params_by_scheme[scheme] > 0 and info.params_by_scheme["fp16"] > 0


def test_artifact_is_not_pickle_and_loads_without_it(tmp_path, monkeypatch):
    path = tmp_path / "m.tgz"
    write_artifact(path, random_gpt(), tiny_config(), "int8", compressor="zlib")
    raw = path.read_bytes()
    assert raw[:4] == b"TGZ1" and raw[:1] != pickle.PROTO and raw[:2] != b"PK"
    blob, _ = decompress(raw)
    assert blob.startswith(MAGIC)

    def forbidden(*args, **kwargs):
        raise AssertionError("loading an artifact must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    load_artifact(path)


def test_write_artifact_never_overwrites_silently(tmp_path):
    path = tmp_path / "m.tgz"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_artifact(path, random_gpt(), tiny_config(), compressor="zlib")
    assert path.read_bytes() == b"precious"
    write_artifact(path, random_gpt(), tiny_config(), compressor="zlib", overwrite=True)
    assert path.read_bytes()[:4] == b"TGZ1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tgz"]  # no temporary file left behind


def test_load_artifact_rejects_a_mismatched_model(tmp_path):
    path = tmp_path / "m.tgz"
    write_artifact(path, random_gpt(), tiny_config(num_layers=3), compressor="zlib")  # config says 3 layers
    with pytest.raises(ValueError, match="missing.*blocks.2"):
        load_artifact(path)


# --- quantized modules (stand-ins for QATLinear and TernaryLinear) --------------------------------------------


class StandInQAT(nn.Linear):
    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None):
        super().__init__(linear.in_features, linear.out_features, bias=True)
        self.bits, self.group_size = bits, group_size
        self.register_buffer("latent_cache", torch.randn(3))  # training state the export must drop
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            self.bias.normal_()

    def quantized_weight(self):
        return quantize_weight(self.weight, self.bits, self.group_size, clip_sigmas=3.0)

    def forward(self, x):
        return F.linear(x, dequantize_weight(*self.quantized_weight(), self.group_size), self.bias)


class StandInTernary(nn.Linear):
    group_size = 16

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        with torch.no_grad():
            self.weight.copy_(linear.weight)

    def ternary_weight(self):
        n, k = self.weight.shape
        groups = -(-k // self.group_size)
        padded = F.pad(self.weight, (0, groups * self.group_size - k)).view(n, groups, self.group_size)
        scales = padded.abs().mean(-1).clamp_min(1e-6).half().float()
        codes = torch.round(padded / scales[..., None]).clamp(-1, 1).to(torch.int8).view(n, -1)[:, :k]
        return codes.contiguous(), scales

    def forward(self, x):
        return F.linear(x, dequantize_weight(*self.ternary_weight(), self.group_size))


def test_quantized_modules_export_their_own_codes(tmp_path):
    model = random_gpt()
    for block in model.blocks:  # QAT attention (bias, cache buffer), ternary MLP
        for attr in ("c_q", "c_k", "c_v", "proj"):
            setattr(block.attn, attr, StandInQAT(getattr(block.attn, attr), bits=6, group_size=24))
        block.mlp.fc, block.mlp.proj = StandInTernary(block.mlp.fc), StandInTernary(block.mlp.proj)
    q = quantize_model(model, "int8", small_numel=SMALL)
    qat, tern = model.blocks[0].attn.c_q, model.blocks[1].mlp.proj
    assert q["blocks.0.attn.c_q.weight"].scheme == "qat6" and q["blocks.0.attn.c_q.weight"].group_size == 24
    assert torch.equal(q["blocks.0.attn.c_q.weight"].codes, qat.quantized_weight()[0])
    assert q["blocks.1.mlp.proj.weight"].scheme == "ternary" and q["blocks.1.mlp.proj.weight"].group_size == 16
    assert torch.equal(q["blocks.1.mlp.proj.weight"].codes, tern.ternary_weight()[0])
    assert not any("latent_cache" in name for name in q)
    assert q["blocks.0.attn.c_q.bias"].scheme == "fp16"

    # Reloaded dense (nn.Linear) from the file, the model computes exactly the quantized forward it trained with.
    # (small_dtype fp32 and an un-quantized embedding leave nothing else changed; nn.Linear has the biases.)
    path = tmp_path / "q.tgz"
    write_artifact(path, model, tiny_config(), "int8", compressor="zstd", small_numel=20_000, small_dtype="fp32")
    tensors, _, _ = read_artifact(path)
    dense = build_model(tiny_config(), linear="bf16")
    for block in dense.blocks:  # the stand-in QAT layers have biases; give the dense model matching nn.Linear
        for attr in ("c_q", "c_k", "c_v", "proj"):
            old = getattr(block.attn, attr)
            setattr(block.attn, attr, nn.Linear(old.in_features, old.out_features, bias=True))
    dense.load_state_dict(dequantize_model(tensors))
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        assert torch.equal(dense.logits(ids), model.logits(ids))


def test_quantized_module_checks():
    class BadScales(nn.Module):
        bits = 6

        def quantized_weight(self):
            return torch.zeros(2, 3, dtype=torch.int8), torch.tensor([[0.1], [0.2]])  # 0.1 is not fp16-exact

    holder = nn.Module()
    holder.layer = BadScales()
    holder.layer.register_buffer("weight", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="layer.weight.*fp16"):
        quantize_model(holder, "int8")

    holder = nn.Module()
    holder.layer = StandInTernary(nn.Linear(20, 3))
    holder.layer.act_bits = 8
    with pytest.warns(UserWarning, match="layer.weight.*act_bits=8"):
        assert quantize_model(holder, "int8")["layer.weight"].scheme == "ternary"


def test_quantize_model_unwraps_torch_compile():
    model = random_gpt()
    plain = quantize_model(model, "int6", small_numel=SMALL)
    wrapped = quantize_model(torch.compile(model, backend="eager"), "int6", small_numel=SMALL)
    assert list(wrapped) == list(plain)


# --- budget and submission -----------------------------------------------------------------------------------


def summary_for(info: ArtifactInfo) -> dict:
    return {"val_bpb": 1.25, "val_loss": 2.1, "roundtrip_val_bpb": 1.26, "roundtrip_val_loss": 2.12,
            "artifact_bytes": info.artifact_bytes, "model_bytes": info.model_bytes, "code_bytes": info.code_bytes,
            "params": 123, "steps": 45, "train_seconds": 10.5, "eval_seconds": 2.5, "tokens_per_second": 1e4,
            "compressor": info.compressor, "hardware": "CPU test", "code_pack": info.code_pack,
            "code_bytes_raw": info.code_bytes_raw}


def test_budget_guard_raises_and_writes_no_submission(tmp_path):
    info = write_artifact(tmp_path / "m.tgz", random_gpt(), tiny_config(), compressor="zlib")
    check_budget(info)  # tiny: far under 16 MB
    with pytest.raises(BudgetExceeded, match="over the 1,000-byte limit"):
        check_budget(info, limit=1000)
    log = tmp_path / "train.log"
    log.write_text("step:1/1 train_loss:5.0\n")
    out = tmp_path / "records" / "2026-01-01_tiny"
    with pytest.raises(BudgetExceeded):
        write_submission(out, summary_for(info), log, tiny_config(), limit=1000)
    assert not (tmp_path / "records").exists()
    with pytest.raises(ValueError, match="!="):
        check_budget({**summary_for(info), "artifact_bytes": 5})


@pytest.mark.parametrize("pack", ["lzma", "none"])
def test_submission_folder(tmp_path, pack):
    model = random_gpt()
    config = tiny_config(code_pack=pack)
    info = write_artifact(tmp_path / "m.tgz", model, config, compressor="zlib")
    log = tmp_path / "train.log"
    log.write_text("step:1/1 train_loss:5.0\n")
    out = tmp_path / "records" / "track_10min_16mb" / "2026-01-01_tiny"
    code = [f for f, _ in info.code_files]
    packed = info.code_pack == "lzma"
    assert packed == (pack == "lzma") and info.code_not_packed == ""
    if packed:  # the script is rebuilt from the files and settings, and must be the size the run counted
        with pytest.raises(ValueError, match="did the sources or the config change"):
            write_submission(out, {**summary_for(info), "code_bytes": info.code_bytes + 1,
                                   "artifact_bytes": info.artifact_bytes + 1}, log, config, code_files=code)
    write_submission(out, summary_for(info), log, config, name="tiny", author="A", github_id="a",
                     blurb="tiny test", code_files=code)
    assert {p.name for p in out.iterdir()} == {"README.md", "submission.json", "train.log", "code",
                                               *(["train_gpt.py"] if packed else [])}
    record = json.loads((out / "submission.json").read_text())
    for key in ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code"):
        assert key in record
    assert record["val_bpb"] == 1.26 and record["pre_export_val_bpb"] == 1.25
    assert record["bytes_total"] == info.artifact_bytes and record["bytes_code"] == info.code_bytes
    assert abs(record["roundtrip_gap_bpb"] - 0.01) < 1e-12 and record["hardware"] == "CPU test"
    for key in ("params", "steps", "train_seconds", "eval_seconds", "bytes_model"):
        assert record[key] is not None
    assert (out / "train.log").read_text() == log.read_text()
    assert sum((out / "code" / f).stat().st_size for f in code) == info.code_bytes_raw
    assert (out / "train_gpt.py").stat().st_size if packed else info.code_bytes_raw == info.code_bytes
    readme = (out / "README.md").read_text()
    assert "1.26000000" in readme and "NUM_LAYERS=2" in readme
    with pytest.raises(FileExistsError, match="overwrite"):
        write_submission(out, summary_for(info), log, config, code_files=code)
    write_submission(out, summary_for(info), log, config, code_files=code, overwrite=True)
    with pytest.raises(ValueError, match="roundtrip_val_bpb"):
        write_submission(tmp_path / "x", {"val_bpb": 1.0}, log, tiny_config())


def test_submission_scores_the_ttt_evaluation_when_the_run_had_one():
    from tgolf.export.submission import render_readme, submission_json

    summary = {"val_bpb": 1.25, "roundtrip_val_bpb": 1.26, "roundtrip_val_loss": 2.12, "ttt_val_bpb": 1.2575,
               "ttt_val_loss": 2.11, "artifact_bytes": 10, "model_bytes": 6, "code_bytes": 4}
    kwargs = dict(name="t", author="", github_id="", blurb="", date="2026-11-28")
    record = submission_json(summary, {}, **kwargs)
    assert (record["val_bpb"], record["val_loss"], record["roundtrip_val_bpb"]) == (1.2575, 2.11, 1.26)
    assert record["ttt_gain_bpb"] == pytest.approx(-0.0025)
    assert "| TTT gain (bpb) | -0.00250000 |" in render_readme(record, {}, [])
    plain = submission_json({**summary, "ttt_val_bpb": None, "ttt_val_loss": None}, {}, **kwargs)
    assert plain["val_bpb"] == 1.26 and plain["ttt_gain_bpb"] is None
    assert "TTT" not in render_readme(plain, {}, [])


def test_code_bytes_counts_imported_tgolf_sources():
    import tgolf.nvtx  # noqa: F401  (imported by the model and the loop: counted)

    code = count_code_bytes()
    files = dict(code.files)
    assert "tgolf/export/artifact.py" in files and "tgolf/model/gpt.py" in files and "tgolf/nvtx.py" in files
    assert not any(f.startswith(("tgolf/profile", "tgolf/bench", "tests")) for f in files)
    assert code.total == sum(files.values()) > 0


def test_missing_compression_library_is_skipped_by_best_and_named_when_asked(monkeypatch):
    from tgolf.export import compress as comp

    real_find_spec = comp.importlib.util.find_spec
    real_import = comp.importlib.import_module
    monkeypatch.setattr(comp.importlib.util, "find_spec",
                        lambda name, *a: None if name == "brotli" else real_find_spec(name, *a))

    def fake_import(name, *a):
        if name == "brotli":
            raise ImportError(name)
        return real_import(name, *a)

    monkeypatch.setattr(comp.importlib, "import_module", fake_import)
    assert "brotli" not in comp.available_compressors()
    blob, chosen, sizes = comp.compress(b"tgolf " * 1000, "best")
    assert chosen != "brotli" and "brotli" not in sizes
    with pytest.raises(ValueError, match="pip install brotli"):
        comp.check_available("brotli")
