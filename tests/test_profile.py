"""tgolf.profile on the CPU: a short real run, a report rebuilt from its trace, and the time accounting."""
from __future__ import annotations

import json

import pytest

from tgolf.profile.__main__ import main as profile_main
from tgolf.profile.categories import categorize
from tgolf.profile.trace import Event, analyze, load_events

TINY = ["--preset", "smoke", "--num-layers", "2", "--model-dim", "64", "--num-heads", "2", "--num-kv-heads", "1",
        "--vocab-size", "128", "--train-seq-len", "32", "--train-batch-tokens", "128", "--grad-accum-steps", "2",
        "--device", "cpu", "--compile", "off"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    assert profile_main([*TINY, "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    return out


def _assert_adds_up(report: dict) -> None:
    for step in report["steps"]:
        assert sum(step["categories"].values()) == pytest.approx(step["ms"], rel=1e-9, abs=1e-9)
    assert sum(report["totals_ms"].values()) == pytest.approx(report["total_ms"], rel=1e-9)
    assert sum(report["mean_ms_per_category"].values()) == pytest.approx(report["mean_step_ms"], rel=1e-9)
    assert sum(report["share_pct"].values()) == pytest.approx(100.0, rel=1e-9)


def test_cpu_run_writes_report_trace_and_charts(cpu_run):
    report = json.loads((cpu_run / "profile.json").read_text())
    assert report["source"] == "cpu" and [s["step"] for s in report["steps"]] == [1, 2]
    _assert_adds_up(report)
    assert report["totals_ms"]["gemm"] > 0 and report["totals_ms"]["optimizer"] > 0
    # The traced window and the host clock measure the same steps.
    for step, host_ms in zip(report["steps"], report["step_ms_host"]):
        assert step["ms"] == pytest.approx(host_ms, rel=0.5)
    assert report["meta"]["params"] > 0 and report["achieved_tflops"] > 0 and "mfu_pct" not in report
    md = (cpu_run / "profile.md").read_text()
    assert "| **total** |" in md and "idle" in md
    for name in ("trace.json.gz", "run.json", "profile_categories.png", "profile_steps.png"):
        assert (cpu_run / name).exists(), name


def test_report_from_recorded_trace(cpu_run, tmp_path):
    assert profile_main(["--from-trace", str(cpu_run / "trace.json.gz"), "--out", str(tmp_path), "--no-charts"]) == 0
    rebuilt = json.loads((tmp_path / "profile.json").read_text())
    original = json.loads((cpu_run / "profile.json").read_text())
    _assert_adds_up(rebuilt)
    assert rebuilt["totals_ms"] == pytest.approx(original["totals_ms"])
    assert rebuilt["achieved_tflops"] == pytest.approx(original["achieved_tflops"])  # run.json beside the trace


def test_run_reads_shards_when_given(tmp_path):
    import numpy as np

    from tgolf.data.shards import shard_name, write_shard

    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / shard_name("train", 0), np.random.default_rng(0).integers(0, 128, 4000))
    out = tmp_path / "out"
    assert profile_main([*TINY, "--data-path", str(data), "--steps", "1", "--warmup", "0", "--out", str(out),
                         "--no-charts"]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["meta"]["data"] == str(data)
    _assert_adds_up(report)


def test_gpu_trace_accounting_with_ranges_streams_and_idle(tmp_path):
    """A hand-made GPU trace: kernels are categorised by name or by the range around their launch, two streams
    overlapping are counted once, and idle is the rest of the step window."""
    def launch(ts, corr):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": 1,
                "args": {"correlation": corr}}

    def kernel(name, ts, dur, corr, stream=7):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": stream,
                "args": {"correlation": corr}}
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "tgolf_step#4", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "optimizer", "ts": 50, "dur": 30, "tid": 1},
        launch(1, 1), kernel("nvjet_tst_128x256_bf16", 10, 20, 1),                 # gemm 10..30
        launch(2, 2), kernel("flash_fwd_kernel", 25, 10, 2, stream=8),             # attention, overlaps 25..30
        launch(3, 3), kernel("Memcpy HtoD (Pinned -> Device)", 40, 5, 3) | {"cat": "gpu_memcpy"},
        launch(55, 4), kernel("nvjet_tst_64x64_bf16", 60, 10, 4),                  # gemm inside optimizer range
        launch(56, 5), kernel("ncclDevKernel_AllReduce_Sum_bf16", 70, 5, 5),       # communication wins
        kernel("triton_poi_fused_mul_0", 90, 20, 99),                               # no launch: clipped at 100
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    result = analyze(load_events(path))
    assert result.source == "gpu"
    (step,) = result.steps
    assert step.step == 4 and step.ms == pytest.approx(0.1)
    us = {k: round(v * 1e3, 6) for k, v in step.categories.items()}
    assert us["gemm"] == 15 and us["attention"] == 10 and us["data"] == 5
    assert us["optimizer"] == 10 and us["communication"] == 5 and us["elementwise"] == 10
    assert us["idle"] == 100 - 55
    assert sum(us.values()) == pytest.approx(100)


def test_trace_without_steps_is_refused():
    with pytest.raises(ValueError, match="no step ranges"):
        analyze([Event("aten::mm", "cpu_op", 0, 1)])


@pytest.mark.parametrize("name, cat, ranges, expected", [
    ("aten::mm", "cpu_op", (), "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "kernel", ("forward", "mlp"), "gemm"),
    ("aten::_scaled_dot_product_flash_attention", "cpu_op", (), "attention"),
    ("aten::rms_norm", "cpu_op", (), "norm"),
    ("_ternary_quantize_kernel", "kernel", (), "quantization"),
    ("aten::normal_", "cpu_op", (), "elementwise"),
    ("aten::mm", "cpu_op", ("optimizer",), "optimizer"),
    ("ncclDevKernel_AllReduce", "kernel", ("optimizer",), "communication"),
    ("aten::copy_", "cpu_op", ("data",), "data"),
    ("triton_per_fused__to_copy_mean_mul_pow_rsqrt_3", "kernel", (), "norm"),
    ("triton_poi_fused_abs_amax_clamp_div_round_1", "kernel", (), "quantization"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "kernel", (), "attention"),
])
def test_categories(name, cat, ranges, expected):
    assert categorize(name, cat, ranges) == expected


def test_bad_nsys_range_is_refused(tmp_path):
    assert profile_main([*TINY, "--steps", "2", "--warmup", "1", "--nsys-steps", "0:5", "--out", str(tmp_path)]) == 2


@pytest.mark.gpu
def test_gpu_run_counts_kernels(tmp_path):
    gpu = [a if a != "cpu" else "cuda" for a in TINY]
    assert profile_main([*gpu, "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["source"] == "gpu" and report["mfu_pct"] > 0
    _assert_adds_up(report)
    assert report["totals_ms"]["gemm"] > 0 and "peak_allocated_gib" in report["meta"]
