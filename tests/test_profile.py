"""tgolf.profile on the CPU: a short real run, a report rebuilt from its trace, and the time accounting."""
from __future__ import annotations

import json

import pytest

from tgolf.profile.__main__ import main as profile_main
from tgolf.profile.categories import categorize
from tgolf.profile.report import slow_outliers
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
    assert sum(report["idle_by_host_ms"].values()) == pytest.approx(report["mean_ms_per_category"]["idle"])
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
    # The GPU waited 0..10, 35..40, 45..50 outside any range, 50..60 and 75..80 in the optimizer, 80..90 after it.
    idle = {k: round(v * 1e3, 6) for k, v in step.idle_by_host.items()}
    assert idle == {"(outside any range)": 30, "optimizer": 15}


H100_PROPS = {"id": 0, "name": "NVIDIA H100 80GB HBM3", "totalGlobalMem": 85017493504, "computeMajor": 9,
              "computeMinor": 0, "numSms": 132}


def _two_spans_per_step_trace(path, step_us=(500, 100, 100)):
    """Like a torch.profiler GPU trace of ``--profile-steps 5:7``: each tgolf_step#N range twice (the host-side
    user_annotation and a shorter gpu_user_annotation copy from first to last kernel), a profiler schedule's
    ProfilerStep#K ranges numbered from its own start and covering the gaps, and a first step 5× slower (start-up).
    Each step: a 50 µs GEMM from t+10, a 10 µs kernel launched inside the optimizer range at t+75."""
    def span(cat, name, ts, dur, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1}

    def launched(name, launch_ts, ts, dur, corr):
        return [span("cuda_runtime", "cudaLaunchKernel", launch_ts, 1) | {"args": {"correlation": corr}},
                span("kernel", name, ts, dur, tid=7) | {"args": {"correlation": corr}}]
    events, t = [], 1000.0
    for k, (number, dur) in enumerate(zip((5, 6, 7), step_us)):
        events += [span("user_annotation", f"ProfilerStep#{k + 1}", t - 5, dur + 10),
                   span("user_annotation", f"tgolf_step#{number}", t, dur),
                   span("gpu_user_annotation", f"tgolf_step#{number}", t + 10, 75, tid=7),
                   span("user_annotation", "optimizer", t + 70, 20),
                   *launched("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", t + 1, t + 10, 50, 2 * k),
                   *launched("triton_poi_fused_mul_0", t + 75, t + 75, 10, 2 * k + 1)]
        t += dur + 10
    trace = {"deviceProperties": [H100_PROPS], "cuda_driver_version": 13000, "cuda_runtime_version": 13000,
             "baseTimeNanoseconds": 1790857026000000000, "traceEvents": events}
    path.write_text(json.dumps(trace))
    return [d / 1e3 for d in step_us]


def _write_run_json(folder, step_ms, env=None):
    meta = {"device": "cuda", "flops_per_step": 1e9, "params": 1000, "tokens_per_step": 64, "grad_accum_steps": 1,
            "step_ms_host": step_ms}
    (folder / "run.json").write_text(json.dumps({"meta": meta, **({"env": env} if env else {})}))


def test_gpu_trace_counts_each_step_once_and_leaves_start_up_out(tmp_path):
    """The bugs of the first H100 trace: steps 5, 5, 6, 6, 7, 7 (host and GPU copies of one range), a first step
    inflated by start-up that made idle 60% and MFU half of what it was, and a header naming this machine."""
    import torch

    step_ms = _two_spans_per_step_trace(tmp_path / "trace.json")
    _write_run_json(tmp_path, step_ms)
    out = tmp_path / "report"
    assert profile_main(["--from-trace", str(tmp_path / "trace.json"), "--out", str(out), "--no-charts"]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert [s["step"] for s in report["steps"]] == [5, 6, 7]  # the host-side span: the host clock's step
    assert [s["ms"] for s in report["steps"]] == pytest.approx(step_ms)
    assert report["excluded_steps"] == [5] and [s["excluded"] for s in report["steps"]] == [True, False, False]
    _assert_adds_up(report)
    assert report["mean_step_ms"] == pytest.approx(0.1) and report["kept_steps"] == 2
    per_step = report["mean_ms_per_category"]
    assert per_step["gemm"] == pytest.approx(0.05) and per_step["optimizer"] == pytest.approx(0.01)
    assert per_step["idle"] == pytest.approx(0.04)  # not the start-up step's 0.44
    assert report["idle_by_host_ms"] == pytest.approx({"(outside any range)": 0.03, "optimizer": 0.01})
    assert report["mfu_pct"] == pytest.approx(100 * 1e9 / 1e-4 / 989e12)
    assert report["top"][0]["ms_per_step"] == pytest.approx(0.05)  # per kept step, not summed over all spans
    md = (out / "profile.md").read_text()
    title, _, run_line = md.splitlines()[:3]
    assert title == "# tgolf profile — NVIDIA H100 80GB HBM3"
    assert run_line.startswith("2026-10-01T12:17:06Z ·") and "driver CUDA driver API 13.0" in run_line
    assert torch.__version__ not in run_line and "report built" in md and "| 5 (start-up, left out) |" in md
    assert report["run_env"]["source"] == "trace" and report["run_env"]["sm_count"] == 132


def test_header_comes_from_the_runs_own_env(tmp_path):
    step_ms = _two_spans_per_step_trace(tmp_path / "trace.json", step_us=(100, 110, 105))
    env = {"date_utc": "2026-11-27T17:22:24Z", "torch": "2.11.0+cu130", "triton": "3.6.0", "git_commit": "05cf2a0",
           "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "driver": "580.159.04",
           "command": "python -m tgolf.train --profile-steps 5:7"}
    _write_run_json(tmp_path, step_ms, env)
    out = tmp_path / "report"
    assert profile_main(["--from-trace", str(tmp_path / "trace.json"), "--out", str(out), "--no-charts"]) == 0
    lines = (out / "profile.md").read_text().splitlines()
    assert lines[2] == ("2026-11-27T17:22:24Z · torch 2.11.0+cu130 · triton 3.6.0 · driver 580.159.04 · "
                        "commit 05cf2a0")
    assert lines[4] == "`python -m tgolf.train --profile-steps 5:7`" and lines[6].startswith("report built ")
    report = json.loads((out / "profile.json").read_text())
    assert report["excluded_steps"] == [] and report["mean_step_ms"] == pytest.approx(0.105)


@pytest.mark.parametrize("ms, flagged", [
    ([1959.4, 509.0, 403.8], [0]),  # the H100 trace: profiler start-up and a recompilation in the first step
    ([2000.0, 400.0], [0]),         # two steps: compared with the other one
    ([400.0, 410.0, 1000.0, 405.0], [2]),
    ([400.0, 700.0, 500.0], []),
    ([400.0], []),
])
def test_slow_outliers(ms, flagged):
    assert slow_outliers(ms) == flagged


def test_window_warms_the_profiler_up_on_the_step_before(tmp_path):
    """--profile-steps A:B starts the profiler (and the ranges) on step A-1 and keeps nothing of it."""
    import torch
    from torch.profiler import record_function

    from tgolf.nvtx import enable_ranges, ranges_enabled
    from tgolf.profile.window import StepWindow

    from torch._dynamo.utils import counters

    from tgolf.nvtx import nvtx_range

    def block(x):
        with nvtx_range("mlp"):
            return torch.relu(x).sum()
    compiled = torch.compile(block, backend="eager", fullgraph=True)

    enable_ranges(False)  # profile_training (earlier tests) leaves them on
    window = StepWindow((2, 3), tmp_path, torch.device("cpu"), {"device": "cpu"})
    enabled, compiles = [], []
    for step in range(5):
        before = counters["stats"]["unique_graphs"]
        with window.around(step):
            enabled.append(ranges_enabled())
            with record_function(f"marker{step}"):
                compiled(torch.randn(16, 16))
        compiles.append(counters["stats"]["unique_graphs"] - before)
    # switching the ranges on may recompile (the compiled code read the flag): in the warm-up step, not in 2..3
    assert compiles[2:4] == [0, 0]
    trace = window.finish(4)
    names = {e.name for e in load_events(trace)}
    assert enabled == [False, True, True, True, False] and not ranges_enabled()
    assert {"tgolf_step#2", "tgolf_step#3", "marker2", "marker3"} <= names
    assert not names & {"marker0", "marker1", "marker4", "tgolf_step#1"}
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["meta"]["profiled_steps"] == [2, 3] and len(recorded["meta"]["step_ms_host"]) == 2
    assert recorded["meta"]["profiler_warmup_steps"] == 1 and recorded["env"]["torch"] == torch.__version__
    assert [s.step for s in analyze(load_events(trace)).steps] == [2, 3]


def test_window_from_step_zero_records_at_once(tmp_path):
    import torch

    from tgolf.profile.window import StepWindow

    window = StepWindow((0, 1), tmp_path, torch.device("cpu"), {"device": "cpu"})
    for step in range(3):
        with window.around(step):
            torch.randn(16, 16).sum()
    trace = window.finish(2)
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["meta"]["profiled_steps"] == [0, 1] and recorded["meta"]["profiler_warmup_steps"] == 0
    assert [s.step for s in analyze(load_events(trace)).steps] == [0, 1]


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
    # inductor's flex attention (--doc-attention on a GPU): a template kernel, named after the op it lowers
    # (meta-pytorch/tritonbench PRs #939, #940 time these two names); not a GEMM despite triton_tem_
    ("triton_tem_fused_flex_attention_0", "kernel", (), "attention"),
    ("triton_tem_fused_flex_attention_backward_zeros_1", "kernel", (), "attention"),
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


def test_switching_ranges_on_does_not_recompile_a_compiled_model():
    # On the first H100 trace, enabling the ranges for the profiling window recompiled the model inside it (the graph
    # guarded on the flag): 1.5 s of the first profiled step.
    import torch
    import torch._dynamo.testing

    from tgolf.nvtx import enable_ranges, nvtx_range

    def body(x):
        with nvtx_range("mlp"):
            return torch.relu(x) * 2

    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(body, backend=counter, fullgraph=True)
    x = torch.randn(8)
    try:
        enable_ranges(False)
        fn(x)
        enable_ranges(True)
        fn(x)
    finally:
        enable_ranges(False)
    assert counter.frame_count == 1
