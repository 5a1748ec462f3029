"""The benchmark framework: declarative cases, correctness before speed, timing against anchors.

A family file (``tgolf/bench/<family>.py``) declares ``cases(shapes) -> list[BenchCase]``. For each case the
framework loads the candidate (the op tgolf ships), checks it against the reference on fresh random inputs
(outputs and, for forward+backward, every gradient), and only then times it beside its anchors in the same
process. A candidate that fails the check gets no speed figure: its row says ``incorrect: rel err X``.
Everything a case needs is imported lazily through loaders, so an op that does not import yet becomes an
``unavailable: <error>`` row instead of stopping the run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

import torch

from tgolf.bench.limits import H100_HBM_BYTES_PER_S, H100_L2_BYTES, peak_flops
from tgolf.bench.timing import TimingPlan, peak_memory_bytes, time_calls, time_graphed

Loader = Callable[[], Callable]


@dataclass
class Impl:
    """One implementation to time: ``load()`` imports and returns the function (called as ``fn(*inputs)``)."""

    load: Loader
    prepare: Callable[[tuple], tuple] | None = None  # untimed conversion of the case's inputs (same positions)
    compiled: bool = False  # a torch.compile anchor (skipped on CPU quick runs: compiling costs more than the run)
    cuda_only: bool = False
    forward_only: bool = False  # has no backward worth timing (e.g. an inference kernel)


@dataclass
class BenchCase:
    op: str  # "<family>.<op>", the name the family registered with tgolf.backend.register_op
    shape: dict[str, int]
    make_inputs: Callable[[torch.device, int], tuple]  # fresh random inputs (never zeros) from a seed
    candidate: Impl
    reference: Loader  # the plain-PyTorch truth, called on the same inputs
    anchors: dict[str, Impl] = field(default_factory=dict)
    flops: float = 0.0  # forward floating-point (or integer) operations
    bytes: float = 0.0  # forward: fewest bytes through device memory (inputs read once, outputs written once)
    grad_argnums: tuple[int, ...] = ()  # inputs that get gradients; empty = forward only
    bwd_flops: float | None = None  # forward+backward total; None = 3 × flops (two more GEMMs per GEMM)
    bwd_bytes: float | None = None  # forward+backward total; None = not reported
    dtype: str = "bf16"
    precision: str = "bf16"  # which H100 compute peak applies
    tol: float = 1e-2  # relative error allowed against the reference
    label: str = ""  # size label for tables and plots; default built from shape
    # A smaller instance of the same op for the correctness check, where the reference cannot run at full size
    # (e.g. quadratic attention at T = 32k). None: check on fresh inputs of the timed shape.
    check_inputs: Callable[[torch.device, int], tuple] | None = None
    chooser: str | None = None  # name under tgolf.backend.OP_CHOICES when it differs from ``op``

    @property
    def family(self) -> str:
        return self.op.split(".", 1)[0]

    @property
    def size_label(self) -> str:
        return self.label or "×".join(f"{k}={v}" for k, v in self.shape.items())

    def work(self, mode: str) -> tuple[float, float | None]:
        if mode == "fwd":
            return self.flops, self.bytes or None
        return (3.0 * self.flops if self.bwd_flops is None else self.bwd_flops), self.bwd_bytes


@dataclass
class GraphTiming:
    """Whether to time CUDA-graph replays beside eager calls: on until a capture fails once, since a failed capture
    can leave the CUDA context unusable for further captures."""

    enabled: bool = True


@dataclass(frozen=True)
class RunOptions:
    device: torch.device
    quick: bool = False
    seed: int = 0
    compile_anchors: bool = True
    deadline: float = math.inf  # time.monotonic() after which remaining cases are skipped
    graphs: GraphTiming = field(default_factory=GraphTiming)


# --------------------------------------------------------------------------------------------------------------
# helpers


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:240]


def tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (on the tensors' device); a shape mismatch, or a non-finite value where ref
    is finite, is inf."""
    if out.shape != ref.shape:
        return math.inf
    a, b = out.detach().to(torch.float64), ref.detach().to(device=out.device, dtype=torch.float64)
    finite = torch.isfinite(b)
    if not torch.isfinite(a[finite]).all() or not torch.equal(torch.isfinite(a), finite):
        return math.inf
    a, b = a[finite], b[finite]
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


def _with_grads(inputs: tuple, grad_argnums: Sequence[int]) -> tuple:
    return tuple(x.detach().requires_grad_(True) if i in grad_argnums else x for i, x in enumerate(inputs))


def _grad_outputs(outs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Upstream gradients, the same for every implementation of a case (same seed, same shapes)."""
    grads = []
    for o in outs:
        gen = torch.Generator(device=o.device).manual_seed(seed + 7919)
        grads.append(torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype))
    return grads


def _differentiable(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o for o in outs if o.requires_grad]


def run_mode(fn: Callable, inputs: tuple, mode: str, grad_argnums: Sequence[int], seed: int) -> list[torch.Tensor]:
    """One call; returns the outputs, then (fwd+bwd) the gradients of the ``grad_argnums`` inputs."""
    if mode == "fwd":
        with torch.no_grad():
            return [t.detach() for t in tensors_of(fn(*inputs))]
    args = _with_grads(inputs, grad_argnums)
    outs = _differentiable(tensors_of(fn(*args)))
    grads = torch.autograd.grad(outs, [args[i] for i in grad_argnums], _grad_outputs(outs, seed),
                                allow_unused=True)
    return [o.detach() for o in outs] + [g if g is not None else torch.zeros_like(args[i])
                                          for g, i in zip(grads, grad_argnums)]


def make_call(fn: Callable, inputs: tuple, mode: str, grad_argnums: Sequence[int], seed: int) -> Callable[[], None]:
    """A zero-argument callable doing one timed repetition (inputs and upstream gradients prepared ahead)."""
    if mode == "fwd":
        def forward() -> None:
            with torch.no_grad():
                fn(*inputs)
        return forward
    args = _with_grads(inputs, grad_argnums)
    wrt = [args[i] for i in grad_argnums]
    grad_outs = _grad_outputs(_differentiable(tensors_of(fn(*args))), seed)

    def forward_backward() -> None:
        outs = _differentiable(tensors_of(fn(*args)))
        torch.autograd.grad(outs, wrt, grad_outs, allow_unused=True)
    return forward_backward


def input_sets(case: BenchCase, opts: RunOptions) -> list[tuple]:
    """Several independent input sets on CUDA (rotated between repetitions, about 4× L2 in all); one on CPU."""
    first = case.make_inputs(opts.device, opts.seed + 1)
    if opts.device.type != "cuda":
        return [first]
    set_bytes = sum(t.numel() * t.element_size() for t in tensors_of(first)) or 1
    count = max(2, min(6, math.ceil(4 * H100_L2_BYTES / set_bytes)))
    return [first] + [case.make_inputs(opts.device, opts.seed + 1 + i) for i in range(1, count)]


def _impl_skip_reason(impl: Impl, mode: str, opts: RunOptions) -> str | None:
    if impl.cuda_only and opts.device.type != "cuda":
        return "skipped: needs CUDA"
    if impl.compiled and not opts.compile_anchors:
        return "skipped: torch.compile anchors off" + (" on CPU quick runs" if opts.quick else "")
    if impl.forward_only and mode != "fwd":
        return "skipped: forward only"
    return None


def _rates(case: BenchCase, mode: str, median_ms: float, device: torch.device) -> dict[str, float | None]:
    """Achieved rates; % of the H100 limits only for GPU runs (a CPU run against them would mean nothing)."""
    flops, nbytes = case.work(mode)
    seconds = median_ms * 1e-3
    tflops = flops / seconds / 1e12 if flops and seconds > 0 else None
    gbps = nbytes / seconds / 1e9 if nbytes and seconds > 0 else None
    on_gpu = device.type == "cuda"
    return {
        "tflops": tflops,
        "gbps": gbps,
        "pct_peak_flops": 100 * tflops * 1e12 / peak_flops(case.precision) if tflops and on_gpu else None,
        "pct_peak_bw": 100 * gbps * 1e9 / H100_HBM_BYTES_PER_S if gbps and on_gpu else None,
    }


def _chosen_backend(case: BenchCase, device: torch.device) -> str | None:
    from tgolf.backend import OP_CHOICES

    chooser = OP_CHOICES.get(case.chooser or case.op)
    if chooser is None:
        return None
    try:
        return chooser(device).backend
    except Exception as exc:  # a chooser that fails is reported, not fatal
        return f"unknown ({describe_error(exc)})"


# --------------------------------------------------------------------------------------------------------------
# one case


def _time_impl(impl: Impl, fn: Callable, sets: list[tuple], mode: str, case: BenchCase, plan: TimingPlan,
               opts: RunOptions) -> dict:
    prepared = [impl.prepare(s) if impl.prepare else s for s in sets]
    calls = [make_call(fn, p, mode, case.grad_argnums, opts.seed) for p in prepared]
    timing = time_calls(calls, opts.device, plan)
    entry = {"status": "ok", **timing.to_dict(), "peak_bytes": peak_memory_bytes(calls[0], opts.device)}
    if opts.device.type == "cuda" and opts.graphs.enabled:
        try:
            entry["graph_ms"] = time_graphed(calls, plan).median_ms
        except Exception as exc:  # e.g. a host synchronisation inside the op: not capturable
            entry["graph_status"] = f"not capturable: {describe_error(exc)}"
            opts.graphs.enabled = False
    return entry


def run_case(case: BenchCase, opts: RunOptions) -> list[dict]:
    """Rows (one per mode) for one case: correctness first, then the candidate's and the anchors' timings."""
    modes = ["fwd"] + (["fwd+bwd"] if case.grad_argnums and not case.candidate.forward_only else [])
    base = {"op": case.op, "family": case.family, "size": case.size_label, "shape": dict(case.shape),
            "dtype": case.dtype, "precision": case.precision, "device": str(opts.device), "backend": None,
            "tol": case.tol}
    rows = [{**base, "mode": m, "status": "", "rel_err": None, "time": None, "anchors": {}} for m in modes]

    if time.monotonic() > opts.deadline:
        return [{**r, "status": "skipped: time budget"} for r in rows]
    skip = _impl_skip_reason(case.candidate, "fwd", opts)
    if skip:
        return [{**r, "status": skip} for r in rows]
    for r in rows:
        r.update({"flops": case.work(r["mode"])[0] or None, "bytes": case.work(r["mode"])[1]})
    try:
        candidate = case.candidate.load()
        reference = case.reference()
    except Exception as exc:
        return [{**r, "status": f"unavailable: {describe_error(exc)}"} for r in rows]
    backend = _chosen_backend(case, opts.device)  # after the load: the op registers itself on import
    for r in rows:
        r["backend"] = backend
    if opts.compile_anchors:
        torch._dynamo.reset()  # a fresh compile cache per case: no recompile limit across shapes
    plan = TimingPlan.for_device(opts.device, opts.quick)
    try:
        sets = input_sets(case, opts)
    except (ImportError, AttributeError) as exc:  # inputs built with a family helper that is not there yet
        return [{**r, "status": f"unavailable: inputs: {describe_error(exc)}"} for r in rows]
    except Exception as exc:
        return [{**r, "status": f"error: inputs: {describe_error(exc)}"} for r in rows]

    for row in rows:
        _fill_row(row, case, candidate, reference, sets, plan, opts)
    del sets
    if opts.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _fill_row(row: dict, case: BenchCase, candidate: Callable, reference: Callable, sets: list[tuple],
              plan: TimingPlan, opts: RunOptions) -> None:
    mode = row["mode"]
    make = case.check_inputs or case.make_inputs
    check_inputs = make(opts.device, opts.seed + 1000)  # fresh: not one of the timed sets
    if case.check_inputs is not None:  # say on which shape the check ran
        row["checked_on"] = [list(t.shape) for t in tensors_of(check_inputs)]
    try:
        got = run_mode(candidate, check_inputs, mode, case.grad_argnums, opts.seed)
    except Exception as exc:
        row["status"] = f"error: {describe_error(exc)}"
        return
    try:
        want = run_mode(reference, check_inputs, mode, case.grad_argnums, opts.seed)
    except Exception as exc:
        row["status"] = f"error: reference: {describe_error(exc)}"
        return
    err = max((rel_err(a, b) for a, b in zip(got, want)), default=0.0) if len(got) == len(want) else math.inf
    row["rel_err"] = err
    if not err <= case.tol:
        row["status"] = f"incorrect: rel err {err:.3g} > {case.tol:g}"
        return
    try:
        row["time"] = _time_impl(case.candidate, candidate, sets, mode, case, plan, opts)
    except Exception as exc:
        row["status"] = f"error: timing: {describe_error(exc)}"
        return
    row["status"] = "ok"
    row.update(_rates(case, mode, row["time"]["median_ms"], opts.device))
    for name, impl in case.anchors.items():
        row["anchors"][name] = _anchor_entry(name, impl, case, sets, mode, plan, opts, row["time"]["median_ms"],
                                             row["time"].get("graph_ms"))


def _anchor_entry(name: str, impl: Impl, case: BenchCase, sets: list[tuple], mode: str, plan: TimingPlan,
                  opts: RunOptions, candidate_ms: float, candidate_graph_ms: float | None = None) -> dict:
    skip = _impl_skip_reason(impl, mode, opts)
    if skip:
        return {"status": skip}
    if time.monotonic() > opts.deadline:
        return {"status": "skipped: time budget"}
    try:
        fn = impl.load()
    except Exception as exc:
        return {"status": f"unavailable: {describe_error(exc)}"}
    try:
        entry = _time_impl(impl, fn, sets, mode, case, plan, opts)
    except Exception as exc:
        return {"status": f"error: {describe_error(exc)}"}
    # > 1 means the candidate is faster than this anchor.
    entry["speedup"] = entry["median_ms"] / candidate_ms if candidate_ms > 0 else None
    if entry.get("graph_ms") and candidate_graph_ms:
        entry["graph_speedup"] = entry["graph_ms"] / candidate_graph_ms
    return entry


def run_cases(cases: Sequence[BenchCase], opts: RunOptions, progress: Callable[[str], None] | None = None,
              on_rows: Callable[[list[dict]], None] | None = None,
              done: Mapping[tuple[str, str], list[dict]] | None = None,
              retry_last: Collection[tuple[str, str]] = (), refresh: Collection[tuple[str, str]] = ()) -> list[dict]:
    """Rows of every case, grouped by op in first-seen order (the cases may come interleaved across ops).

    ``on_rows`` receives the rows so far after every case, so that a run killed by a timeout leaves results.
    ``done`` maps (op, size) to rows measured earlier (a resumed run): those cases keep them and are not run,
    except the ``refresh`` ones (rows from an older commit), which run again while the time budget lasts.
    The order: cases no run has reached, then ``retry_last`` (cases an earlier run's budget cut), then
    ``refresh``. On the 2026-11-28 H200 run, two resumed runs (206 s) each spent their budget re-running the same
    cut cases first (the slowest ones, which is why they had been cut) and finished no new one."""
    done = done or {}
    results: dict[int, list[dict]] = {}

    def ordered() -> list[dict]:
        per_op: dict[str, list[dict]] = {}
        for i, case in enumerate(cases):
            if i in results:
                per_op.setdefault(case.op, []).extend(results[i])
        return [row for rows in per_op.values() for row in rows]

    def rank(i: int) -> int:
        key = (cases[i].op, cases[i].size_label)
        return 2 if key in refresh else 1 if key in retry_last else 0
    for n, i in enumerate(sorted(range(len(cases)), key=rank)):
        case = cases[i]
        key = (case.op, case.size_label)
        earlier = done.get(key)
        keep = earlier is not None and (key not in refresh or time.monotonic() > opts.deadline)
        if progress:
            progress(f"[{n + 1}/{len(cases)}] {case.op} {case.size_label}" + (" (kept)" if keep else ""))
        if keep:
            results[i] = earlier
        else:
            start = time.monotonic()
            results[i] = run_case(case, opts)
            seconds = round(time.monotonic() - start, 1)
            for row in results[i]:
                row["case_seconds"] = seconds  # the whole case (every mode and anchor): for planning GPU time
            if progress:
                progress(f"    {seconds:.1f} s")
        if on_rows:
            on_rows(ordered())
    return ordered()
