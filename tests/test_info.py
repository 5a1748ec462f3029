"""`python -m tgolf.info` names a backend, with its reason, for every registered op."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tgolf import backend, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TGOLF_BACKEND", "TRITON_INTERPRET")}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "tgolf.info", *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=120, check=True)


def test_info_json_names_a_fallback_for_every_op_on_cpu():
    report = json.loads(_run("--json").stdout)
    assert report["torch"] == torch.__version__
    assert report["import_errors"] == {}
    expected_devices = {"cuda", "cpu"} if torch.cuda.is_available() else {"cpu"}
    assert len(report["ops"]) >= 5
    for name, per_device in report["ops"].items():
        assert set(per_device) == expected_devices, name
        assert per_device["cpu"]["backend"] == "reference", name  # no TRITON_INTERPRET in the child
        assert per_device["cpu"]["reason"], name
    ext = report["extension"]
    assert ext["built"] or (ext["why_not"] and ext["build_plan"])


def test_info_text_lists_versions_gpu_extension_and_ops():
    text = _run(TRITON_INTERPRET="1").stdout
    assert f"torch {torch.__version__}" in text and "GPU:" in text and "CUDA extension tgolf._C:" in text
    ops = [line for line in text.splitlines() if line.startswith("  ") and " cpu " in line]
    assert ops and any(" triton " in line for line in ops)  # the interpreter is a CPU backend too


def test_collect_survives_a_family_that_fails_to_import(monkeypatch):
    monkeypatch.setattr(info, "OP_PACKAGES", info.OP_PACKAGES + ("tgolf.ops.does_not_exist",))
    report = info.collect()
    assert "tgolf.ops.does_not_exist" in report["import_errors"]
    assert "failed to import" in info.render(report)


def test_forced_backend_that_is_not_available_says_so():
    report = json.loads(_run("--json", TGOLF_BACKEND="triton").stdout)  # no TRITON_INTERPRET in the child
    for name, per_device in report["ops"].items():
        cpu = per_device["cpu"]
        assert cpu["backend"] == "reference" and cpu["reason"].startswith("TGOLF_BACKEND=triton is not available"), name
    forced = json.loads(_run("--json", TGOLF_BACKEND="reference").stdout)
    assert all(d["cpu"]["reason"] == "forced by TGOLF_BACKEND" for d in forced["ops"].values())


def test_backend_choice_follows_the_environment_within_a_process(monkeypatch):
    """Choices are memoized per process; changing TGOLF_BACKEND or TRITON_INTERPRET mid-run still changes them."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TGOLF_BACKEND", "reference")
    assert backend.choose(cpu).reason == "forced by TGOLF_BACKEND"
    monkeypatch.delenv("TGOLF_BACKEND")
    assert backend.choose(cpu).backend == ("triton" if backend.triton_importable() else "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend.choose(cpu).backend == "reference"
    monkeypatch.setenv("TGOLF_BACKEND", "gpu")
    with pytest.raises(ValueError, match="TGOLF_BACKEND='gpu'"):
        backend.choose(cpu)
