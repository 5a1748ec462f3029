"""Low-rank corrections of the export's rounding errors (tgolf.export.lowrank): what they remove, weighted by the
layer's inputs or not, their file layout and its checks, and the reload."""
from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn as nn

from tests.test_gptq import correlated_inputs
from tgolf.export.artifact import load_artifact, read_artifact, write_artifact
from tgolf.export.format import MAGIC, FormatError, deserialize, serialize
from tgolf.export.lowrank import lowrank_correction
from tgolf.export.quantize import (BASELINE_CLIP_QUANTILE, QuantTensor, part_lowrank_ranks, quantize_model,
                                   quantize_rows)


def rounded(w: torch.Tensor, bits: int = 5) -> QuantTensor:
    codes, scales = quantize_rows(w, bits, BASELINE_CLIP_QUANTILE)
    return QuantTensor(f"int{bits}", tuple(w.shape), codes=codes, scales=scales)


def squared_error(w: torch.Tensor, qt: QuantTensor) -> float:
    return float((w - qt.dequantize()).square().sum())


def test_the_correction_removes_more_of_the_rounding_error_as_its_rank_grows():
    w = torch.randn(96, 200) * 0.02
    qt = rounded(w)
    errors = [squared_error(w, qt)]
    for rank in (1, 4, 16, 64):
        qt.correction = lowrank_correction(w, rounded(w).dequantize(), rank)
        up, down = qt.correction
        assert (up.scheme, up.shape, down.scheme, down.shape) == ("int4", (rank, 96), "int4", (rank, 200))
        assert int(up.codes.abs().max()) <= 7 and int(down.codes.abs().max()) <= 7
        errors.append(squared_error(w, qt))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.6 * errors[0]


@pytest.mark.parametrize("scheme, left", [("int4", 0.05), ("int8", 0.001)])
def test_an_error_of_low_rank_is_removed_up_to_the_factors_rounding(scheme, left):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 80, generator=g)
    planted = torch.randn(64, 3, generator=g) @ torch.randn(3, 80, generator=g) * 0.1
    up, down = lowrank_correction(w, w - planted, 3, scheme)
    residual = planted - up.dequantize().T @ down.dequantize()
    assert float(residual.square().sum()) < left * float(planted.square().sum())


def test_the_layers_inputs_steer_the_correction_to_the_outputs_that_move():
    w = torch.randn(64, 160) * 0.02
    x = correlated_inputs(4096, 160)
    hessian = x.T @ x / x.shape[0]
    dequantized = rounded(w).dequantize()

    def output_error(correction) -> float:
        up, down = correction
        return float((x @ (w - dequantized - up.dequantize().T @ down.dequantize()).T).square().sum())

    plain, weighted = (output_error(lowrank_correction(w, dequantized, 8, hessian=h)) for h in (None, hessian))
    assert weighted < 0.7 * plain


def test_exact_weights_get_a_zero_correction_and_ranks_beyond_the_shape_are_cut():
    w = torch.randn(6, 40)
    up, down = lowrank_correction(w, w.clone(), 16)
    assert up.shape == (6, 6) and down.shape == (6, 40)
    product = up.dequantize().T @ down.dequantize()
    assert torch.isfinite(product).all() and float(product.abs().max()) < 1e-6


def test_bad_arguments_are_named():
    w = torch.randn(8, 12)
    for kwargs, match in [(dict(rank=0), "rank=0"), (dict(rank=2, scheme="int9"), "lowrank scheme"),
                          (dict(rank=2, hessian=torch.eye(8)), "hessian: shape")]:
        with pytest.raises(ValueError, match=match):
            lowrank_correction(w, w, **kwargs)
    with pytest.raises(ValueError, match="dequantized: shape"):
        lowrank_correction(w, w.T, 2)
    model = nn.Sequential(nn.Linear(12, 8, bias=False))
    with pytest.raises(ValueError, match=r"lowrank_ranks\['0.weight'\]=-1"):
        quantize_model(model, "int6", small_numel=0, lowrank_ranks={"0.weight": -1})
    with pytest.raises(ValueError, match="lowrank_scheme"):
        quantize_model(model, "int6", small_numel=0, lowrank_ranks={"0.weight": 2}, lowrank_scheme="fp16")
    with pytest.raises(ValueError, match=r"lowrank_ranks given for tensors the model does not have: \['1.weight'\]"):
        quantize_model(model, "int6", small_numel=0, lowrank_ranks={"1.weight": 2})


def test_quantize_model_corrects_the_int_matrices_only_and_keeps_their_codes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 24), nn.Linear(24, 40, bias=False), nn.Linear(4, 4, bias=False))
    x = correlated_inputs(512, 24)
    hessians = {"1.weight": x.T @ x / x.shape[0]}
    plain = quantize_model(model, "int5", small_numel=100, hessians=dict(hessians))
    corrected = quantize_model(model, "int5", small_numel=100, hessians=dict(hessians), lowrank_scheme="int6",
                               lowrank_ranks={"0.weight": 3, "1.weight": 3, "2.weight": 3})
    for name in ("0.weight", "1.weight"):  # the same codes and scales (GPTQ's for the linear), and a correction
        assert torch.equal(corrected[name].codes, plain[name].codes)
        assert torch.equal(corrected[name].scales, plain[name].scales)
        assert corrected[name].correction[0].scheme == "int6" and corrected[name].correction[0].shape[0] == 3
        w = model[int(name[0])].weight.detach()
        assert squared_error(w, corrected[name]) < squared_error(w, plain[name])
    assert corrected["2.weight"].scheme == "fp16" and corrected["2.weight"].correction is None


def _corrected_tensors() -> dict[str, QuantTensor]:
    w = torch.randn(10, 70)
    qt = rounded(w, 6)
    qt.correction = lowrank_correction(w, qt.dequantize(), 2)
    return {"m": qt, "bias": QuantTensor("fp16", (10,), data=torch.randn(10).half())}


def test_a_corrected_file_reads_back_exactly_and_only_it_is_version_3():
    tensors = _corrected_tensors()
    blob = serialize(tensors, {"x": 1})
    assert struct.unpack_from("<I", blob, 8)[0] == 3
    back = deserialize(blob)[0]
    for want, got in zip((tensors["m"], *tensors["m"].correction), (back["m"], *back["m"].correction)):
        assert (got.scheme, got.shape) == (want.scheme, want.shape)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert torch.equal(back["m"].dequantize(), tensors["m"].dequantize())
    tensors["m"].correction = None
    assert struct.unpack_from("<I", serialize(tensors, {}), 8)[0] == 2


def _header_and_payload(blob: bytes) -> tuple[dict, bytes]:
    length = struct.unpack_from("<Q", blob, 12)[0]
    return json.loads(blob[20:20 + length]), blob[20 + length:]


def _rejoin(header: dict, payload: bytes, version: int = 3) -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<IQ", version, len(text)) + text + payload


def test_a_bad_correction_is_a_format_error_naming_the_tensor():
    header, payload = _header_and_payload(serialize(_corrected_tensors(), {}))
    entry = header["tensors"][0]
    with pytest.raises(FormatError, match="'m'.*needs a version 3 file"):
        deserialize(_rejoin(header, payload, version=2))

    def broken(change) -> bytes:
        copy = json.loads(json.dumps(header))
        change(copy["tensors"][0]["correction"], copy["tensors"])
        return _rejoin(copy, payload)

    cases = [
        (lambda c, t: c.pop("down"), "missing field 'down'"),
        (lambda c, t: c["up"].pop("name"), "'m' correction up: missing field 'name'"),
        (lambda c, t: c.update(up=c["down"], down=c["up"]), r"'m' correction up: field 'shape' is \[2, 70\], "
                                                            r"expected \[r, 10\]"),
        (lambda c, t: c["up"].update(shape=[2, 11]), "'m correction up': field 'codes' length 10 bytes, expected 11"),
        (lambda c, t: c["up"].update(scheme="qat4"), "'m' correction up: must be an int4"),
        (lambda c, t: t[1].update(correction=c), "only allowed on int schemes"),
    ]
    for change, match in cases:
        with pytest.raises(FormatError, match=match):
            deserialize(broken(change))
    down = dict(entry["correction"]["down"], shape=[1, 70], codes=[entry["correction"]["down"]["codes"][0], 35],
                scales=[entry["correction"]["down"]["scales"][0], 2])
    with pytest.raises(FormatError, match="ranks differ"):
        deserialize(broken(lambda c, t: c.update(down=down)))


def test_the_artifact_reloads_the_corrected_weights(tmp_path):
    from tgolf.config import Config
    from tgolf.model import build_model

    config = Config(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=256, mlp_mult=2)
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # the output projections start at zero: give every matrix a rounding error
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    ranks = part_lowrank_ranks(model, 4, 4, small_numel=4096)
    info = write_artifact(tmp_path / "a.tgolf", model, config, "int5", "zlib", small_numel=4096, lowrank_ranks=ranks)
    plain = write_artifact(tmp_path / "b.tgolf", model, config, "int5", "zlib", small_numel=4096)
    tensors, _, meta = read_artifact(info.path)
    corrected = [name for name, qt in tensors.items() if qt.correction is not None]
    assert corrected == [name for name, qt in tensors.items() if qt.scheme == "int5"] and corrected
    assert meta["lowrank_tensors"] == len(corrected) and meta["lowrank_scheme"] == "int4"
    assert "lowrank_tensors" not in read_artifact(plain.path)[2]
    assert info.params_by_scheme["int4"] == sum(4 * sum(tensors[n].shape) for n in corrected)
    assert info.model_bytes > plain.model_bytes
    reloaded, _ = load_artifact(info.path)
    without, _ = load_artifact(plain.path)
    state, reference, rounded_only = reloaded.state_dict(), model.state_dict(), without.state_dict()
    for name in corrected:
        assert torch.equal(state[name], tensors[name].dequantize())
        assert (state[name] - reference[name]).norm() < (rounded_only[name] - reference[name]).norm()


def test_part_lowrank_ranks_give_the_embedding_its_own_rank():
    from tgolf.config import Config
    from tgolf.model import build_model

    model = build_model(Config(num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=97,
                               tie_embeddings=False))
    assert part_lowrank_ranks(model, 0, 8, small_numel=0) == {"tok_emb.weight": 8, "lm_head.weight": 8}
    ranks = part_lowrank_ranks(model, 4, 0, small_numel=0)
    assert sorted(ranks) == sorted(n for n, t in model.state_dict().items()
                                   if t.dim() == 2 and n not in ("tok_emb.weight", "lm_head.weight"))
    assert set(ranks.values()) == {4} and part_lowrank_ranks(model) == {}
