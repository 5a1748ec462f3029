"""GPTQ export: exact round-to-nearest codes when inputs are uncorrelated, smaller output error when they are not,
the calibration's second moments, its place in quantize_model and in the whole run."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from tgolf.export.artifact import read_artifact
from tgolf.export.gptq import collect_hessians, gptq_quantize
from tgolf.export.quantize import BASELINE_CLIP_QUANTILE, quantize_model, quantize_rows
from tgolf.ops.quant.reference import dequantize_weight, qmax_for_bits


def correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with a few strong shared directions and uneven channel scales, as real layer inputs have."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, k, generator=g) * 3.0
    return (torch.randn(rows, 8, generator=g) @ mixing + torch.randn(rows, k, generator=g)) * \
        torch.logspace(-1, 0.5, k)[torch.randperm(k, generator=g)]


def output_error(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> float:
    return (x @ (w - dequantize_weight(codes, scales)).T).norm().item()


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_give_round_to_nearest_codes(bits, act_order):
    w = torch.randn(40, 300)
    rtn_codes, scales = quantize_rows(w, bits, BASELINE_CLIP_QUANTILE)
    diagonal = torch.diag(torch.rand(300) + 0.1)
    assert torch.equal(gptq_quantize(w, diagonal, scales, bits, act_order), rtn_codes)


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_correlated_inputs_get_a_smaller_output_error(bits, act_order):
    k = 200  # more than one 128-column block: the lazy block update is exercised
    w = torch.randn(64, k) * 0.02
    x = correlated_inputs(4096, k)
    rtn_codes, scales = quantize_rows(w, bits, BASELINE_CLIP_QUANTILE)
    codes = gptq_quantize(w, x.T @ x / x.shape[0], scales, bits, act_order)
    qmax = qmax_for_bits(bits)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert int(codes.abs().max()) <= qmax
    assert output_error(x, w, codes, scales) < 0.5 * output_error(x, w, rtn_codes, scales)
    # ... while it only moves codes by a step or two, not to arbitrary values
    assert int((codes.int() - rtn_codes.int()).abs().max()) <= 4


def test_dead_inputs_and_bad_arguments():
    w = torch.randn(8, 16)
    x = torch.randn(100, 16)
    x[:, [3, 7]] = 0.0  # channels that never fire
    _, scales = quantize_rows(w, 6, None)
    codes = gptq_quantize(w, x.T @ x, scales, 6)
    assert int(codes.abs().max()) <= qmax_for_bits(6)
    with pytest.raises(ValueError, match="hessian: expected shape"):
        gptq_quantize(w, torch.eye(15), scales, 6)
    with pytest.raises(ValueError, match="scales: expected per-row"):
        gptq_quantize(w, torch.eye(16), torch.ones(8, 2), 6)
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq_quantize(w, torch.full((16, 16), float("nan")), scales, 6)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, torch.eye(16), scales, 9)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20, bias=False)
        self.down = nn.Linear(20, 12, bias=False)
        self.small = nn.Linear(12, 2, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))).sum() + self.small(x).sum() * 0 + y.sum() * 0


def test_collect_hessians_measures_the_mean_input_second_moment():
    model = TwoLinears()
    batches = [(torch.randn(3, 5, 12), torch.zeros(1)) for _ in range(2)]
    hessians = collect_hessians(model, batches, min_numel=24)
    assert sorted(hessians) == ["down.weight", "up.weight"]  # small (2x12 = 24 elements) is left out
    xs = torch.cat([x.reshape(-1, 12) for x, _ in batches])
    assert torch.allclose(hessians["up.weight"], xs.T @ xs / xs.shape[0], rtol=1e-5, atol=1e-6)
    hidden = torch.relu(xs @ model.up.weight.T)
    assert torch.allclose(hessians["down.weight"], hidden.T @ hidden / hidden.shape[0], rtol=1e-5, atol=1e-6)
    assert not model._forward_hooks and not model.up._forward_hooks  # hooks removed
    assert model.training  # mode restored


def test_collect_hessians_adds_matrices_used_without_a_module_call():
    model = TwoLinears()
    model.register_parameter("table", nn.Parameter(torch.randn(30, 12)))
    batches = [(torch.randn(2, 4, 12), torch.zeros(1))]
    hessians = collect_hessians(model, batches, inputs_of={"table": lambda m, x: torch.tanh(x)})
    t = torch.tanh(batches[0][0]).reshape(-1, 12)
    assert torch.allclose(hessians["table"], t.T @ t / t.shape[0], rtol=1e-5, atol=1e-6)
    assert "table" not in collect_hessians(model, batches, min_numel=360, inputs_of={"table": lambda m, x: x})
    for bad in ("nothing", "up.weight"):  # unknown, or measured by its hook already
        with pytest.raises(ValueError, match="inputs_of"):
            collect_hessians(model, batches, inputs_of={bad: lambda m, x: x})


def test_quantize_model_takes_gptq_codes_with_rtn_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(160, 96, bias=False))
    x = correlated_inputs(2048, 160)
    hessian = x.T @ x / x.shape[0]
    plain = quantize_model(model, "int5", small_numel=0)["0.weight"]
    gptq = quantize_model(model, "int5", small_numel=0, hessians={"0.weight": hessian})["0.weight"]
    assert torch.equal(gptq.scales, plain.scales) and not torch.equal(gptq.codes, plain.codes)
    w = model[0].weight.detach()
    assert output_error(x, w, gptq.codes, gptq.scales) < output_error(x, w, plain.codes, plain.scales)
    with pytest.raises(ValueError, match="not int matrices"):
        quantize_model(model, "int5", small_numel=0, hessians={"1.weight": hessian})


def test_quantize_model_gives_named_matrices_their_own_bits():
    model = nn.Sequential(nn.Embedding(64, 48), nn.Linear(48, 64, bias=False), nn.Linear(4, 4, bias=False))
    out = quantize_model(model, "int5", small_numel=100, schemes={"0.weight": "int8", "2.weight": "int8"})
    assert (out["0.weight"].scheme, out["1.weight"].scheme, out["2.weight"].scheme) == ("int8", "int5", "fp16")
    codes, scales = quantize_rows(model[0].weight.detach(), 8, BASELINE_CLIP_QUANTILE)
    assert torch.equal(out["0.weight"].codes, codes) and torch.equal(out["0.weight"].scales, scales)
    with pytest.raises(ValueError, match="does not have"):
        quantize_model(model, "int5", schemes={"3.weight": "int8"})
    with pytest.raises(ValueError, match="int4..int8"):
        quantize_model(model, "int5", schemes={"0.weight": "int9"})


def test_part_schemes_give_the_mlp_and_the_embedding_their_own_bits():
    from tgolf.config import Config
    from tgolf.export.quantize import part_schemes
    from tgolf.model import build_model

    model = build_model(Config(num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=97,
                               tie_embeddings=False, bigram_vocab_size=16, bigram_dim=4))
    schemes = part_schemes(model, embed_scheme="int8", mlp_scheme="int5")
    assert {name for name, scheme in schemes.items() if scheme == "int5"} == {
        f"blocks.{i}.mlp.{part}.weight" for i in range(2) for part in ("fc", "proj")}
    assert {name for name, scheme in schemes.items() if scheme == "int8"} == {
        "tok_emb.weight", "bigram.table.weight", "lm_head.weight"}
    assert part_schemes(model) == {}
    out = quantize_model(model, "int6", small_numel=0, schemes=schemes)
    assert (out["blocks.0.mlp.fc.weight"].scheme, out["blocks.0.attn.c_q.weight"].scheme,
            out["tok_emb.weight"].scheme) == ("int5", "int6", "int8")


@pytest.mark.parametrize("calibration", [
    ("--gptq-tokens", "1024"),
    # 4 sequences of 32 tokens the model samples, 2 at each temperature: no data read
    ("--gptq-tokens", "128", "--gptq-calibration", "self", "--gptq-self-seq-len", "32",
     "--gptq-self-temperatures", "0.5,1.5"),
], ids=["train", "self"])
def test_run_with_gptq_calibrates_the_dense_matrices(tmp_path, tiny_shards, monkeypatch, capsys, calibration):
    """With the fused MLP, whose op reads the linears' weights without calling them (its reference backend here,
    for speed: the interpreter's kernels are tested in test_mlp.py)."""
    from tgolf.train.__main__ import main
    from tests.test_run import _flags

    monkeypatch.setenv("TGOLF_BACKEND", "reference")
    assert main(_flags(tiny_shards, tmp_path, "--run-id", "g", "--iterations", "3", "--val-tokens-limit", "512",
                       "--model-dim", "128", "--num-heads", "4", "--num-kv-heads", "2", "--mlp-mult", "5", "--mlp", "fused",
                       "--export-scheme", "int5", "--export-embed-scheme", "int8", *calibration)) == 0
    source = "tokens sampled by the model at temperatures 0.5,1.5" if "self" in calibration else "training tokens"
    assert f"matrices on {int(calibration[1]):,} {source} in" in capsys.readouterr().out
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    # the MLPs' fc and proj (640 x 128), the only linears over 65,536 elements, and the tied embedding (1024 x 128)
    assert summary["gptq_tensors"] == 5
    tensors, _, meta = read_artifact(tmp_path / "g" / "model.tgolf")
    assert meta["gptq_tensors"] == 5
    assert tensors["tok_emb.weight"].scheme == "int8" and tensors["blocks.0.mlp.fc.weight"].scheme == "int5"
    assert summary["roundtrip_val_bpb"] - summary["val_bpb"] < 0.05


def test_gptq_needs_float_matrices():
    from tgolf.config import Config

    with pytest.raises(ValueError, match="gptq_tokens"):
        Config(linear="qat6", gptq_tokens=1024).validate()
    with pytest.raises(ValueError, match="gptq_tokens"):
        Config(gptq_tokens=-1).validate()
