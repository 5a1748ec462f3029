"""A window of real training steps recorded with torch.profiler (``--profile-steps A:B``).

The steps are the run's own (its data, compiled model, optimizers and schedule), so the trace shows exactly what a
timed run spends. Each step in the window is one ``tgolf_step#N`` range ending in a synchronisation, NVTX/profiler
ranges are on only inside the window, and GPU telemetry is sampled meanwhile. ``finish()`` writes ``trace.json.gz``
and ``run.json`` (with the run's env: device, driver, torch, triton, commit) into ``<run>/profile/``;
``python -m tgolf.profile --from-trace <run>/profile/trace.json.gz`` turns them into the report (time by category,
MFU, clocks).

Step A-1 (when there is one) is the profiler's warm-up: the profiler starts and the ranges switch on there, and
nothing of it is kept. On an H100 the first recorded step without it took 1959 ms against ~400 ms: CUPTI starting,
and torch.compile recompiling because the compiled model's guards read the ranges' on/off flag (no longer: see
``tgolf.nvtx``).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import profile, record_function

from tgolf.nvtx import enable_ranges
from tgolf.profile.env import collect_env
from tgolf.profile.run import peak_memory, save_trace, step_profiler
from tgolf.profile.telemetry import Telemetry


class StepWindow:
    """Profiles steps ``first..last`` (counted from 0: step 0 is the first timed step) on this process."""

    def __init__(self, steps: tuple[int, int], out_dir: Path, device: torch.device, meta: dict):
        self.steps, self.out_dir, self.device, self.meta = steps, out_dir, device, meta
        self.warmup = 1 if steps[0] >= 1 else 0  # step 0 has no step before it to warm the profiler up in
        self.step_ms: list[float] = []
        self._prof: profile | None = None
        self._telemetry: Telemetry | None = None
        self._overhead_s = 0.0

    def take_overhead(self) -> float:
        """Seconds the profiler's own bookkeeping took inside the steps since the last call: its start, and at the
        window's end the collection of its events (about 5.8 s after a 3-step window of the baseline on the 2026-11-28
        H200 run, which the training clock counted then). The training loop leaves them out of training time."""
        seconds, self._overhead_s = self._overhead_s, 0.0
        return seconds

    def _start(self) -> None:
        enable_ranges(True)
        self._prof = step_profiler(self.device.type == "cuda", self.steps[1] - self.steps[0] + 1,
                                   self.warmup).__enter__()

    def _stop(self) -> None:
        self._prof.__exit__(None, None, None)
        if self._telemetry is not None:
            self._telemetry.__exit__(None, None, None)
        enable_ranges(False)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def around(self, step: int) -> Iterator[None]:
        """Wrap one training step; outside the window (and its warm-up step) this does nothing."""
        first, last = self.steps
        if not first - self.warmup <= step <= last:
            yield
            return
        if step == first - self.warmup:
            t0 = time.perf_counter()
            self._start()
            self._overhead_s += time.perf_counter() - t0
        if step < first:
            yield
            self._sync()  # the first recorded step then holds only its own GPU work
        else:
            if step == first:
                self._telemetry = Telemetry().__enter__()
            t0 = time.perf_counter()
            with record_function(f"tgolf_step#{step}"):
                yield
                self._sync()  # the step's window holds all its GPU work
            self.step_ms.append(1e3 * (time.perf_counter() - t0))
        t0 = time.perf_counter()  # the step's GPU work is done (synchronised above): what follows is bookkeeping
        self._prof.step()
        if step == last:
            self._stop()
        self._overhead_s += time.perf_counter() - t0

    def finish(self, last_step: int) -> Path | None:
        """Close the window if the run ended inside it; write the trace and run.json. None if nothing was recorded."""
        if self._prof is None:
            return None
        if last_step < self.steps[1]:
            self._stop()
        if not self.step_ms:  # the run ended in the warm-up step
            return None
        trace = save_trace(self._prof, self.out_dir)
        first = self.steps[0]
        meta = {**self.meta, "profiled_steps": list(range(first, first + len(self.step_ms))),
                "profiler_warmup_steps": self.warmup, "telemetry": self._telemetry.summary(),
                **peak_memory(self.device)}
        (self.out_dir / "run.json").write_text(json.dumps({"meta": {**meta, "step_ms_host": self.step_ms},
                                                           "env": collect_env(),
                                                           "telemetry_samples": self._telemetry.samples},
                                                          indent=1) + "\n")
        return trace
