"""Step-by-step time accounting from a torch.profiler chrome trace.

Each step is a window: the host-side ``tgolf_step#N`` range (else ``ProfilerStep#N``), one per step; see
``step_windows``. Inside it, time is cut at every
event boundary; each slice goes to the category of the innermost busy event covering it (the latest to
start), or to ``idle`` when none does. So the categories and idle add up to the step's duration exactly,
overlaps (nested CPU operators, concurrent GPU streams) are never counted twice, and an operator's parent
gets only its own (exclusive) time.

Busy events are GPU kernels, memcpys and memsets when the trace has any (a GPU run: idle is time the GPU
waited), else CPU operators (a CPU run: idle is Python and framework time between operators).
"""
from __future__ import annotations

import datetime
import gzip
import heapq
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tgolf.profile.categories import CATEGORIES, IDLE, categorize

STEP_RE = re.compile(r"^(tgolf_step|ProfilerStep)#(\d+)$")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op",)
RANGE_CATS = ("user_annotation",)
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
NO_RANGE = "(outside any range)"


@dataclass
class Event:
    name: str
    cat: str
    start: float  # µs
    end: float
    tid: object = 0
    correlation: int | None = None


@dataclass
class StepTimes:
    step: int
    ms: float
    categories: dict[str, float]  # ms per category, IDLE included; sums to ms
    kernels: dict[tuple[str, str], float] = field(default_factory=dict)  # (category, name) → attributed ms
    idle_by_host: dict[str, float] = field(default_factory=dict)  # innermost host range → idle ms; sums to idle


@dataclass
class TraceAnalysis:
    source: str  # "gpu" or "cpu": which events counted as busy
    steps: list[StepTimes]


def load_trace(path: str | Path) -> tuple[list[Event], dict]:
    """The complete ("X") events of a chrome trace, and its top-level metadata (deviceProperties, versions...)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    raw = data["traceEvents"] if isinstance(data, dict) else data
    info = {k: v for k, v in data.items() if k != "traceEvents"} if isinstance(data, dict) else {}
    events = []
    for e in raw:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        start = float(e["ts"])
        args = e.get("args") or {}
        events.append(Event(e.get("name", ""), e.get("cat", ""), start, start + float(e["dur"]), e.get("tid", 0),
                            args.get("correlation")))
    return events, info


def load_events(path: str | Path) -> list[Event]:
    return load_trace(path)[0]


def trace_env(info: dict, events: list[Event]) -> dict:
    """What a trace itself says about the machine that recorded it (torch.profiler writes deviceProperties and
    the CUDA driver/runtime versions, not torch's or triton's): a fallback for runs that did not record their env."""
    env: dict = {"source": "trace"}
    base_ns = info.get("baseTimeNanoseconds")
    if base_ns is not None and events:  # kineto's timestamps are µs after this base: the trace's wall-clock start
        start_s = base_ns / 1e9 + min(e.start for e in events) / 1e6
        env["date_utc"] = datetime.datetime.fromtimestamp(start_s, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    devices = info.get("deviceProperties") or []
    if devices:
        props = devices[0]
        env.update(device="cuda", device_name=props.get("name"), device_count=len(devices),
                   sm_count=props.get("numSms"), capability=f"{props.get('computeMajor')}.{props.get('computeMinor')}")
        if props.get("totalGlobalMem"):
            env["memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
    for key, out in (("cuda_driver_version", "cuda_driver_api"), ("cuda_runtime_version", "cuda_runtime")):
        if info.get(key):  # 13000 → "13.0"
            env[out] = f"{info[key] // 1000}.{info[key] % 1000 // 10}"
    return env


def _enclosing(queries: list[tuple[float, object]], ranges: list[Event]) -> list[list[str]]:
    """For each (timestamp, thread), the names of the ranges on that thread containing it, outermost first."""
    by_tid: dict[object, list[Event]] = defaultdict(list)
    for r in ranges:
        by_tid[r.tid].append(r)
    for lst in by_tid.values():
        lst.sort(key=lambda r: (r.start, -r.end))
    result: list[list[str]] = [[] for _ in queries]
    order = sorted(range(len(queries)), key=lambda i: (str(queries[i][1]), queries[i][0]))
    tid, pending, active, j = object(), [], [], 0
    for i in order:
        ts, qtid = queries[i]
        if qtid != tid:
            tid, pending, active, j = qtid, by_tid.get(qtid, []), [], 0
        while j < len(pending) and pending[j].start <= ts:
            active.append(pending[j])
            j += 1
        active = [r for r in active if r.end >= ts]
        result[i] = [r.name for r in active]
    return result


def _innermost(window: tuple[float, float], spans: list[tuple[float, float]]):
    """Cut ``window`` at every span boundary; yield (start, end, index of the innermost span covering the slice —
    the latest to start, then the shortest — or None). Spans are already clipped to the window."""
    lo, hi = window
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    bounds = sorted({lo, hi, *(s for s, _ in spans), *(e for _, e in spans)})
    heap: list[tuple[float, float, int]] = []  # (-start, end, index)
    k = 0
    for a, b in zip(bounds, bounds[1:]):
        while k < len(order) and spans[order[k]][0] <= a:
            i = order[k]
            heapq.heappush(heap, (-spans[i][0], spans[i][1], i))
            k += 1
        while heap and heap[0][1] <= a:
            heapq.heappop(heap)
        yield a, b, (heap[0][2] if heap else None)


def _attribute(window: tuple[float, float], busy: list[tuple[float, float, str, str]],
               top: dict[tuple[str, str], float]) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """Sweep one window; busy = (start, end, category, name) already clipped to the window. Returns µs per category
    and the idle slices; adds each (category, name)'s µs to ``top``."""
    out = {c: 0.0 for c in (*CATEGORIES, IDLE)}
    idle: list[tuple[float, float]] = []
    for a, b, idx in _innermost(window, [(e[0], e[1]) for e in busy]):
        if idx is None:
            out[IDLE] += b - a
            idle.append((a, b))
        else:
            out[busy[idx][2]] += b - a
            top[(busy[idx][2], busy[idx][3])] += b - a
    return out, idle


def _idle_by_host(window: tuple[float, float], idle: list[tuple[float, float]],
                  host: list[tuple[float, float, str]]) -> dict[str, float]:
    """µs of the idle slices by the innermost host range open at the time (what the loop was doing while the
    GPU waited: ``data``, ``optimizer``, …), or NO_RANGE outside them."""
    pieces = [(a, b, host[i][2] if i is not None else NO_RANGE)
              for a, b, i in _innermost(window, [(s, e) for s, e, _ in host])]
    out: dict[str, float] = defaultdict(float)
    j = 0
    for a, b in idle:  # both lists are sorted and disjoint: one merge pass
        while j < len(pieces) and pieces[j][1] <= a:
            j += 1
        k = j
        while k < len(pieces) and pieces[k][0] < b:
            out[pieces[k][2]] += min(b, pieces[k][1]) - max(a, pieces[k][0])
            k += 1
    return dict(out)


def step_windows(events: list[Event]) -> list[tuple[int, Event]]:
    """One window per step number, in time order.

    A GPU trace holds each record_function range twice: the host-side ``user_annotation`` and a
    ``gpu_user_annotation`` copy spanning the step's first to last kernel; a profiler schedule adds its own
    ``ProfilerStep#K`` ranges (counted from the profiler's start, and covering the gaps between steps). The window
    is the host-side ``tgolf_step#N`` range: it opens before the step's data loading and closes after the
    synchronisation that ends the step, so it holds all the step's GPU work and the GPU's idle time too, and it is
    the time the training loop's own clock measures. ``ProfilerStep#K`` serves only traces without tgolf ranges.
    """
    host = [(int(m.group(2)), m.group(1), e) for e in events
            if not e.cat.startswith("gpu_") and (m := STEP_RE.match(e.name))]
    ours = [h for h in host if h[1] == "tgolf_step"]
    chosen: dict[int, Event] = {}
    for number, _, e in ours or host:  # a number seen twice (a re-entered range): the longer span
        if number not in chosen or e.end - e.start > chosen[number].end - chosen[number].start:
            chosen[number] = e
    return sorted(chosen.items(), key=lambda s: s[1].start)


def analyze(events: list[Event]) -> TraceAnalysis:
    steps = step_windows(events)
    if not steps:
        raise ValueError("trace has no step ranges (tgolf_step#N or ProfilerStep#N): record steps with "
                         "tgolf.profile or torch.profiler's schedule")
    device = [e for e in events if e.cat in DEVICE_CATS]
    source = "gpu" if device else "cpu"
    busy = device if device else [e for e in events if e.cat in HOST_CATS and not STEP_RE.match(e.name)]
    ranges = [e for e in events if e.cat in RANGE_CATS and not STEP_RE.match(e.name)]
    if device:  # a kernel's ranges are those around its launch on the CPU
        launches = {e.correlation: e for e in events if e.cat in LAUNCH_CATS and e.correlation is not None}
        anchors = [launches.get(e.correlation, e) for e in busy]
    else:
        anchors = busy
    names = _enclosing([(a.start, a.tid) for a in anchors], ranges)
    labelled = [(e.start, e.end, categorize(e.name, e.cat, rs), e.name) for e, rs in zip(busy, names)]

    results = []
    for number, window in steps:
        lo, hi = window.start, window.end
        clipped = [(max(s, lo), min(t, hi), c, n) for s, t, c, n in labelled if t > lo and s < hi]
        top: dict[tuple[str, str], float] = defaultdict(float)
        per_cat, idle = _attribute((lo, hi), clipped, top)
        host = [(max(r.start, lo), min(r.end, hi), r.name) for r in ranges
                if r.tid == window.tid and r.end > lo and r.start < hi]
        results.append(StepTimes(number, (hi - lo) / 1e3, {c: us / 1e3 for c, us in per_cat.items()},
                                 {key: us / 1e3 for key, us in top.items()},
                                 {name: us / 1e3 for name, us in _idle_by_host((lo, hi), idle, host).items()}))
    return TraceAnalysis(source, results)
