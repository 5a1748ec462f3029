"""A pytest hook (conftest.py imports it; `-p _failure_log` loads it alone): with ``TGOLF_TEST_FAILURES=FILE`` in the environment, each failure's
report is appended to FILE as soon as it happens.

Why: pytest prints the tracebacks only at the end of the session, and the GPU check runs the tests under a time
limit. On the 2026-11-28 H200 run the limit cut pytest at 98%, after five failures, and not one traceback was
written. scripts/gpu_check.sh sets the variable; under pytest-xdist only the controller writes, once per failure.
"""
from __future__ import annotations

import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("TGOLF_TEST_FAILURES")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
