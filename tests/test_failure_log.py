"""tests/_failure_log.py: failures written to TGOLF_TEST_FAILURES as they happen, with and without xdist."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SAMPLE = '''
def test_passes():
    assert True

def test_fails():
    assert 1 + 1 == 3, "arithmetic"
'''


@pytest.mark.parametrize("workers", [0, 2])
def test_each_failure_is_logged_once_with_its_traceback(tmp_path, workers):
    if workers and importlib.util.find_spec("xdist") is None:
        pytest.skip("pytest-xdist is not installed")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    log = tmp_path / "failures.txt"
    env = {**os.environ, "TGOLF_TEST_FAILURES": str(log), "PYTHONPATH": str(TESTS)}
    env.pop("PYTEST_XDIST_WORKER", None)  # this test may itself run in an xdist worker
    args = ["-n", str(workers)] if workers else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_failure_log",
                           *args, str(tmp_path / "test_sample.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = log.read_text()
    assert text.count("==== ") == 1 and "test_sample.py::test_fails (call)" in text, text
    assert "arithmetic" in text and "assert (1 + 1) == 3" in text, text
    assert "test_passes" not in text
