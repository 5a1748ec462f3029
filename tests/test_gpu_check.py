"""scripts/gpu_check.sh rehearsed on the CPU (GPU_CHECK_DEVICE=cpu): every step runs for real on small shapes, so
the plumbing the scarce GPU session relies on (budget, step records, archive, summary, exit status) is proven here."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "timeout", "tar", "awk")),
                                reason="needs bash, timeout, tar and awk")


def _run(tmp_path: Path, data: Path | str, **env: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out = tmp_path / "out"
    # no compile caches from this checkout's own GPU sessions, unless a test hands some
    full_env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu",
                "GPU_CHECK_CACHE": "", **env}
    full_env.pop("TRITON_INTERPRET", None)  # the check must run as a user would start it
    proc = subprocess.run(["bash", str(SCRIPT), str(data), str(out)], env=full_env, capture_output=True, text=True,
                          timeout=600)
    folders = list((tmp_path / "tgolf_gpu_check" / "profiles").iterdir())
    assert len(folders) == 1, folders
    return proc, folders[0], out


def _steps(folder: Path) -> dict[str, str]:
    with open(folder / "steps.tsv", newline="") as f:
        return {row[0]: row[1] for row in csv.reader(f, delimiter="\t")}


def test_cpu_rehearsal_runs_every_step_and_archives_the_results(tmp_path, tiny_shards):
    proc, folder, out = _run(tmp_path, tiny_shards, GPU_CHECK_SKIP="install wheels", GPU_CHECK_TRAIN_SECONDS="20",
                             GPU_CHECK_BENCH_SECONDS="60", GPU_CHECK_UNTIL="590")
    steps = _steps(folder)
    assert proc.returncode == 0, (steps, proc.stdout[-3000:], proc.stderr[-3000:])
    assert steps["install"] == "skipped (GPU_CHECK_SKIP)" and steps["memcheck"] == "skipped (no GPU)"
    assert steps["restore-caches"].startswith("skipped (no "), steps  # no earlier session's caches here
    for name in ("info", "pytest-gpu", "bench", "profile", "train", "bench-more"):
        assert steps[name] == "ok", (name, (folder / f"{name}.log").exists() and proc.stdout[-3000:])

    summary = (out / "summary.md").read_text()
    assert summary == (folder / "summary.md").read_text() and summary in proc.stdout
    assert "(check) + " in summary and "(bench-more)" in summary  # the check's own time, apart
    assert json.loads((folder / "bench" / "bench.json").read_text())["meta"]["resumed_from"].endswith("bench")
    assert "## Benchmarks: quick shapes on cpu" in summary and "| train | ok |" in summary and "val_bpb" in summary
    for name in ("bench.md", "profile.md", "env.json", "check.log", "model.tgolf"):  # the artifact comes back too
        assert (out / name).stat().st_size > 0, name

    # The profile report is built from the window of the training run itself.
    report = json.loads((folder / "profile" / "profile.json").read_text())
    assert "train/baseline/profile/trace.json.gz" in report["meta"]["trace"] and len(report["steps"]) == 2

    # The follow-up's LoRA TTT step scores the artifact that training wrote (its other steps have their own test).
    proc = _followup(tmp_path, tiny_shards, GPU_CHECK_SKIP="bench-resume profile-mix-order-on tune")
    assert _steps(folder)["lora-ttt"] == "ok", proc.stdout[-3000:]
    lora = json.loads((folder / "lora_ttt.json").read_text())
    assert lora["unit"] == "documents" and lora["adapted_chunks"] == lora["chunks"] > 0
    # ... and the low-rank A/B exports the weights it saved again, without and with corrections
    none, embed = (json.loads((folder / f"lowrank-{cell}.log").read_text().splitlines()[-1])
                   for cell in ("none", "embed8"))
    assert (none["export_lowrank_embed_rank"], embed["export_lowrank_embed_rank"]) == (0, 8)
    assert embed["model_bytes"] > none["model_bytes"] and none["val_bpb"] == embed["val_bpb"] and none["gptq_tensors"]
    assert _steps(folder)["lowrank-matrices8"] == "ok"  # the smoke model's other matrices stay fp16: nothing to add
    # ... measures the entropy coder on the check's artifact and the int6 one
    assert _steps(folder)["measure-codes"] == "ok", proc.stdout[-3000:]
    measured = json.loads((folder / "measure_codes.json").read_text())
    assert [Path(m["artifact"]).name for m in measured] == ["model.tgolf", "lowrank-none.tgolf"]
    assert all(set(m["model_bytes"]) == {"none", "rans"} for m in measured)
    # ... and profiles a few steps of depth recurrence with parallel lanes
    assert _steps(folder)["profile-recurrence-lanes"] == "ok", proc.stdout[-3000:]
    assert json.loads((folder / "profile-recurrence-lanes" / "profile.json").read_text())["steps"]

    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    prefix = f"profiles/{folder.name}/"
    for name in ("env.json", "steps.tsv", "summary.md", "bench/bench.json", "profile/profile.json",
                 "train/baseline/summary.json", "train.log"):
        assert prefix + name in names, name


def _followup(tmp_path: Path, *data: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_followup.sh"), str(tmp_path / "out2"), *map(str, data)],
                          env=full_env, capture_output=True, text=True, timeout=600)


def test_followup_resumes_the_benchmarks_and_searches_tiles(tmp_path):
    # An earlier session's benchmarks (one family, "measured" at another commit), which the check resumes from ...
    earlier = tmp_path / "earlier"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "tgolf.bench", "--device", "cpu", "--shapes", "quick", "--ops", "ternary",
                    "--no-plots", "--no-compile", "--out", str(earlier)], check=True, env=env, capture_output=True,
                   timeout=300)
    data = json.loads((earlier / "bench.json").read_text())
    data["meta"]["git_commit"] = "0ldc0de"
    for row in data["rows"]:
        row["measured"]["git_commit"] = "0ldc0de"
    (earlier / "bench.json").write_text(json.dumps(data))
    # ... and its compile caches, which the check unpacks before its first step that compiles ...
    cache = tmp_path / "cache"
    (cache / "triton" / "ab").mkdir(parents=True)
    (cache / "triton" / "ab" / "kernel.cubin").write_bytes(b"earlier session")
    subprocess.run(["tar", "czf", str(tmp_path / "compile_cache.tar.gz"), "-C", str(cache), "triton"], check=True)
    # ... then the check (only what the follow-up needs: its bench), then the follow-up on the same stage.
    proc, folder, out = _run(tmp_path, "", GPU_CHECK_SKIP="wheels install info pytest-gpu profile",
                             GPU_CHECK_BENCH_RESUME=str(earlier / "bench.json"),
                             GPU_CHECK_CACHE=str(tmp_path / "compile_cache.tar.gz"))
    assert _steps(folder)["bench"] == "ok" and _steps(folder)["restore-caches"] == "ok", proc.stdout[-2000:]
    with tarfile.open(out / "compile_cache.tar.gz") as tar:  # this session's caches, the earlier ones included
        assert tar.extractfile("triton/ab/kernel.cubin").read() == b"earlier session"
    checked = json.loads((folder / "bench" / "bench.json").read_text())
    assert checked["meta"]["resumed_from"] == str(earlier / "bench.json")
    order = [line.split("] ", 1)[1] for line in (folder / "bench.log").read_text().splitlines()
             if line.startswith("[")]
    families = [name.split(".", 1)[0] for name in order]
    first_ternary = families.index("ternary")  # the earlier session's cases come last, measured again or kept
    assert set(families[first_ternary:]) == {"ternary"} and first_ternary > 0, order
    proc = _followup(tmp_path)
    steps = _steps(folder)
    assert proc.returncode == 0, (steps, proc.stdout[-3000:], proc.stderr[-2000:])
    assert steps["bench-resume"] == "ok" and steps["tune"] == "ok", steps
    assert steps["lora-ttt"].startswith("skipped (no artifact"), steps  # the check here trained nothing
    assert steps["lowrank-embed8"].startswith("skipped (no trained weights"), steps
    assert steps["profile-cuda-graphs"] == "skipped (CUDA graphs need a GPU)", steps
    import torch._inductor.config as inductor_config  # the A/B profile runs only where torch lacks the fix
    has_fix = hasattr(inductor_config.triton, "mix_order_reduction_max_reads")
    assert steps["profile-mix-order-on"] == ("skipped (torch has the fix of pytorch#179423: nothing to compare)"
                                             if has_fix else "ok"), steps
    bench = json.loads((folder / "bench" / "bench.json").read_text())
    assert bench["meta"]["resumed_from"].endswith("bench")
    summary = (tmp_path / "out2" / "summary.md").read_text()
    assert "(check) + " in summary and "(follow-up)" in summary and "kernel shapes; best tile / default" in summary
    assert (tmp_path / "out2" / "tune.md").stat().st_size > 0
    assert (tmp_path / "out2" / "compile_cache.tar.gz").stat().st_size > 0  # the follow-up's caches come back too
    with tarfile.open(tmp_path / "out2" / "gpu_followup.tar.gz") as tar:
        names = set(tar.getnames())
    assert f"profiles/{folder.name}/tune/tune.json" in names and f"profiles/{folder.name}/bench/bench.json" in names


def test_summary_says_how_far_a_cut_pytest_got_and_why_its_failures_failed(tmp_path):
    """A pytest step cut by its limit has no closing line: the summary counts the outcomes its -v log reached, and
    lists each failure with its last E line from pytest_failures.txt."""
    (tmp_path / "steps.tsv").write_text("pytest-gpu\ttimeout\t110\tpytest.log\n")
    (tmp_path / "pytest.log").write_text(
        "16 workers [5 items]\n"
        "[gw0] [ 20%] PASSED tests/test_a.py::test_one\n"
        "[gw1] [ 40%] FAILED tests/test_csrc.py::test_cuda_ops_raise_clear_errors[group_size-group_size must be]\n"
        "[gw0] [ 60%] PASSED tests/test_a.py::test_two\n")
    (tmp_path / "pytest_failures.txt").write_text(
        "==== tests/test_csrc.py::test_cuda_ops_raise_clear_errors[group_size-group_size must be] (call)\n"
        "    def test(): ...\nE       AssertionError: crashed (exit status -11): |\nE       assert -11 == 0\n\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check_summary.py"), str(tmp_path), "9"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert "| pytest-gpu | timeout | 110 | cut before the end: 2 passed, 1 failed of 5 |" in proc.stdout
    assert ("- `tests/test_csrc.py::test_cuda_ops_raise_clear_errors[group_size-group_size must be] (call)`: "
            "assert -11 == 0") in proc.stdout
    (tmp_path / "pytest.log").write_text("...\n======= 4 passed, 1 failed in 80.2s =======\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check_summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert "| pytest-gpu | timeout | 110 | 4 passed, 1 failed in 80.2s |" in proc.stdout


def test_followup_without_a_check_says_so(tmp_path):
    proc = _followup(tmp_path)
    assert proc.returncode == 2 and "no check to follow up" in proc.stderr


def test_exhausted_budget_skips_steps_but_still_reports(tmp_path):
    proc, folder, out = _run(tmp_path, "", GPU_CHECK_BUDGET="5")
    steps = _steps(folder)
    assert proc.returncode == 0, proc.stderr
    assert all(status.startswith("skipped") for status in steps.values()), steps
    assert steps["train"] == "skipped (no shards given)" and steps["bench"].startswith("skipped (budget")
    assert (out / "gpu_check.tar.gz").exists() and "| bench | skipped" in (out / "summary.md").read_text()


def test_failed_step_sets_the_exit_status(tmp_path):
    # A shards folder that does not exist: training starts and fails, and the check says so.
    proc, folder, _ = _run(tmp_path, tmp_path / "missing", GPU_CHECK_SKIP="install wheels info pytest-gpu bench profile",
                           GPU_CHECK_TRAIN_SECONDS="20")
    assert _steps(folder)["train"].startswith("failed (rc"), proc.stdout[-2000:]
    assert proc.returncode == 1


def test_unknown_device_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "GPU_CHECK_DEVICE": "tpu", "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "GPU_CHECK_DEVICE=tpu" in proc.stderr


def _quality(tmp_path: Path, data: Path, lengths: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu",
           "QUALITY_SECONDS": "30"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_quality.sh"), str(data), str(tmp_path / "q"), lengths],
                          env=env, capture_output=True, text=True, timeout=900)


def test_quality_comparison_runs_in_two_calls_and_keeps_the_first(tmp_path, tiny_shards):
    """Issue 6's softmax / linear / hybrid comparison: one length, then both, the second call reusing the first's
    runs, one table of all six, archived."""
    proc = _quality(tmp_path, tiny_shards, "32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    (folder,) = (tmp_path / "tgolf_gpu_quality" / "profiles").iterdir()
    assert folder.name.endswith("-quality")
    proc = _quality(tmp_path, tiny_shards, "32,64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads((folder / "sweep" / "sweep.json").read_text())["rows"]
    assert sorted((r["attention"], r["train_seq_len"]) for r in rows) == sorted(
        (a, t) for a in ("softmax", "linear", "hybrid") for t in ("32", "64"))
    assert all(r["status"] == "ok" and r["val_bpb"] > 0 for r in rows), rows
    assert (folder / "sweep-32-64.log").read_text().count("reusing") == 3  # the first call's runs, not rerun
    assert _steps(folder) == {"sweep-32": "ok", "sweep-32-64": "ok"}
    assert (tmp_path / "q" / "sweep.md").read_text().count("| ok |") == 6
    with tarfile.open(tmp_path / "q" / "gpu_quality.tar.gz") as tar:
        assert f"profiles/{folder.name}/sweep/sweep.json" in tar.getnames()
