"""Timing of one callable: warm-up, many repetitions, median and interquartile range.

On CUDA each repetition is bracketed by CUDA events; the L2 cache is evicted before every repetition (a write
over a buffer larger than L2, outside the timed region) and the caller rotates among several input sets, so a
kernel is never timed on operands the previous repetition left in cache. On the CPU a host clock suffices.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tgolf.bench.limits import H100_L2_BYTES


@dataclass(frozen=True)
class TimingPlan:
    """How long to warm up and how many repetitions to take."""

    warmup_ms: float = 25.0  # at least this much warm-up work (and at least min_warmup calls)
    min_warmup: int = 3
    target_ms: float = 150.0  # aim the timed repetitions at about this much total work
    min_reps: int = 10
    max_reps: int = 200
    flush_l2: bool = True  # CUDA only

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> "TimingPlan":
        if device.type == "cuda":
            return cls()
        # CPU figures only prove the plumbing: a few repetitions (one on quick runs: the correctness check
        # already ran every input path once), no long warm-up.
        return cls(warmup_ms=0.0, min_warmup=0 if quick else 1, target_ms=0.0, min_reps=1 if quick else 5,
                   max_reps=1 if quick else 20, flush_l2=False)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    reps: int

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "q25_ms": self.q25_ms, "q75_ms": self.q75_ms, "reps": self.reps}


def summarize(samples_ms: Sequence[float]) -> Timing:
    ordered = sorted(samples_ms)
    if len(ordered) >= 2:
        q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q25 = q75 = ordered[0]
    return Timing(statistics.median(ordered), q25, q75, len(ordered))


def _reps_for(per_call_ms: float, plan: TimingPlan) -> int:
    if per_call_ms <= 0:
        return plan.max_reps
    return max(plan.min_reps, min(plan.max_reps, int(plan.target_ms / per_call_ms)))


def peak_memory_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """Device memory one call allocates at its peak, above what was allocated before it (CUDA only; None else):
    its temporaries and outputs, e.g. the logits a fused loss never materialises."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def time_graphed(calls: Sequence[Callable[[], object]], plan: TimingPlan) -> Timing:
    """Time the same calls replayed from CUDA graphs (one per input set): the GPU's time without the host's.

    Eager timing charges the host's launch work (Python, custom-op dispatch, Triton's launcher) whenever it is
    slower than the GPU; a replay issues the captured kernels at once, so the difference between the two times is
    that overhead. Each call runs once more outside the capture (on a side stream, as capture requires) first."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for call in calls:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graphs.append(graph)
    return _time_cuda([g.replay for g in graphs], plan)


def time_calls(calls: Sequence[Callable[[], object]], device: torch.device, plan: TimingPlan) -> Timing:
    """Time ``calls[i % len(calls)]()`` repeatedly (each call one input set) and summarize per-call times."""
    if not calls:
        raise ValueError("calls: need at least one callable")
    if device.type == "cuda":
        return _time_cuda(calls, plan)
    return _time_host(calls, plan)


def _time_host(calls: Sequence[Callable[[], object]], plan: TimingPlan) -> Timing:
    t0, warm = time.perf_counter(), 0
    while warm < plan.min_warmup or (time.perf_counter() - t0) * 1e3 < plan.warmup_ms:
        calls[warm % len(calls)]()
        warm += 1
    per_call = (time.perf_counter() - t0) * 1e3 / warm if warm else 0.0
    samples = []
    for i in range(_reps_for(per_call, plan)):
        start = time.perf_counter()
        calls[i % len(calls)]()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def _time_cuda(calls: Sequence[Callable[[], object]], plan: TimingPlan) -> Timing:
    # Twice the L2 size, written between repetitions, so no operand survives in cache.
    scratch = torch.empty(2 * H100_L2_BYTES, dtype=torch.int8, device="cuda") if plan.flush_l2 else None
    calls[0]()  # compilation and autotuning happen here, outside the warm-up that sizes the repetitions
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    warm = 0
    while True:
        calls[warm % len(calls)]()
        warm += 1
        if warm >= plan.min_warmup:
            end.record()
            torch.cuda.synchronize()
            if begin.elapsed_time(end) >= plan.warmup_ms:
                break
    per_call = begin.elapsed_time(end) / warm
    reps = _reps_for(per_call, plan)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if scratch is not None:
            scratch.zero_()
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])
