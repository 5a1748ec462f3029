"""A window of real training steps recorded with torch.profiler (``--profile-steps A:B``).

The steps are the run's own (its data, compiled model, optimizers and schedule), so the trace shows exactly what a
timed run spends. Each step in the window is one ``tgolf_step#N`` range ending in a synchronisation, NVTX/profiler
ranges are on only inside the window, and GPU telemetry is sampled meanwhile. ``finish()`` writes ``trace.json.gz``
and ``run.json`` into ``<run>/profile/``; ``python -m tgolf.profile --from-trace <run>/profile/trace.json.gz`` turns
them into the report (time by category, MFU, clocks).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tgolf.nvtx import enable_ranges
from tgolf.profile.run import save_trace
from tgolf.profile.telemetry import Telemetry


class StepWindow:
    """Profiles steps ``first..last`` (counted from 0: step 0 is the first timed step) on this process."""

    def __init__(self, steps: tuple[int, int], out_dir: Path, device: torch.device, meta: dict):
        self.steps, self.out_dir, self.device, self.meta = steps, out_dir, device, meta
        self.step_ms: list[float] = []
        self._prof: profile | None = None
        self._telemetry = None

    def _start(self) -> None:
        enable_ranges(True)
        self._telemetry = Telemetry().__enter__()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=activities).__enter__()

    def _stop(self) -> None:
        self._prof.__exit__(None, None, None)
        self._telemetry.__exit__(None, None, None)
        enable_ranges(False)

    @contextlib.contextmanager
    def around(self, step: int) -> Iterator[None]:
        """Wrap one training step; outside the window this does nothing."""
        if not self.steps[0] <= step <= self.steps[1]:
            yield
            return
        if step == self.steps[0]:
            self._start()
        t0 = time.perf_counter()
        with record_function(f"tgolf_step#{step}"):
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the step's window holds all its GPU work
        self.step_ms.append(1e3 * (time.perf_counter() - t0))
        if step == self.steps[1]:
            self._stop()

    def finish(self, last_step: int) -> Path | None:
        """Close the window if the run ended inside it; write the trace and run.json. None if nothing was recorded."""
        if self._prof is None:
            return None
        if last_step < self.steps[1]:
            self._stop()
        trace = save_trace(self._prof, self.out_dir)
        first = self.steps[0]
        meta = {**self.meta, "profiled_steps": list(range(first, first + len(self.step_ms))),
                "telemetry": self._telemetry.summary()}
        (self.out_dir / "run.json").write_text(json.dumps({"meta": {**meta, "step_ms_host": self.step_ms},
                                                           "telemetry_samples": self._telemetry.samples},
                                                          indent=1) + "\n")
        return trace
