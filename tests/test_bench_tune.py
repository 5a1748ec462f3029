"""python -m tgolf.bench.tune on the CPU (the Triton interpreter): plumbing, the check before timing, errors."""
from __future__ import annotations

import json

import pytest
import torch

from tgolf.bench import tune
from tgolf.bench.timing import TimingPlan

needs_interpreter = pytest.mark.skipif(not tune.triton_interpret(), reason="needs TRITON_INTERPRET=1")
CPU = torch.device("cpu")
PLAN = TimingPlan.for_device(CPU, quick=True)


@needs_interpreter
def test_cli_times_every_kernel_and_tile(tmp_path):
    assert tune.main(["--device", "cpu", "--kernels", "int8_mm,qat_matmul", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tune.json").read_text())
    assert [r["kernel"] for r in data["rows"]] == ["int8_mm", "qat_matmul"]
    for row in data["rows"]:
        assert row["status"] == "ok" and row["default_ms"] > 0 and row["cublas_bf16_ms"] > 0
        assert {c["status"] for c in row["candidates"]} == {"ok"} and row["best_config"] in (
            c["config"] for c in row["candidates"])
    assert len(data["rows"][1]["candidates"]) == 2 * len(tune._QUICK_TILES)  # × BLOCK_K 64 and 128
    assert "| int8_mm | 40 | 48 | 36 |" in (tmp_path / "tune.md").read_text()


def _fake(run) -> tune.Tunable:
    def inputs(m, k, n, device):
        return (torch.randn(m, k), torch.randn(n, k))
    return tune.Tunable("fake", inputs, run, tune._tiles("BLOCK_M", "BLOCK_N"))


def test_a_wrong_or_failing_tile_gets_no_time():
    def run(inputs, config):
        x, w = inputs
        if config is None:
            return x @ w.T
        if config["BLOCK_M"] == 16:
            return x @ w.T * 1.1  # wrong
        raise RuntimeError("out of resource: shared memory")

    row = tune.tune_shape(_fake(run), 8, 16, 12, CPU, tune._QUICK_TILES, PLAN, deadline=float("inf"))
    wrong, failing = row["candidates"]
    assert wrong["status"].startswith("incorrect: rel err") and "ms" not in wrong
    assert failing["status"].startswith("error: RuntimeError: out of resource") and "ms" not in failing
    assert "best_config" not in row and row["default_ms"] > 0


def test_exact_kernels_must_agree_bit_for_bit():
    def run(inputs, config):
        x, w = inputs
        return x @ w.T + (0 if config is None else 1e-6)
    fake = _fake(run)
    exact = tune.Tunable(fake.name, fake.inputs, fake.run, fake.configs, exact=True)
    assert all(c["status"].startswith("incorrect") for c in tune.tune_shape(
        exact, 8, 16, 12, CPU, tune._QUICK_TILES, PLAN, deadline=float("inf"))["candidates"])
    assert all(c["status"] == "ok" for c in tune.tune_shape(
        fake, 8, 16, 12, CPU, tune._QUICK_TILES, PLAN, deadline=float("inf"))["candidates"])


def test_bad_arguments(monkeypatch, capsys):
    assert tune.main(["--device", "cpu", "--kernels", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err
    monkeypatch.setattr(tune, "triton_interpret", lambda: False)
    assert tune.main(["--device", "cpu", "--kernels", "int8_mm"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_gpu_search_space_fits_the_launchers():
    # Every GPU tile names exactly the keys its launcher's default config has (plus BLOCK_K where it is searched).
    from tgolf.kernels import quant, ternary

    defaults = {"int8_mm": ternary.int8_config(65536, False), "ternary_mm": ternary.mm_config(65536, False),
                "qat_matmul": quant.gemm_blocks(fp8=False, interpret=False)}
    for name, tunable in tune.TUNABLES.items():
        for cfg in tunable.configs(tune._TILES):
            assert set(cfg) == set(defaults[name]), (name, cfg, defaults[name])
