"""``python -m tgolf.profile --preset NAME --steps N --out DIR [--nsys-steps A:B] [--from-trace FILE]``.

Profile a few training steps of the real GPT (random tokens unless --data-path is given) and report where
the time goes. Any Config field can be overridden with its flag (--num-layers 2 --model-dim 64 ...).

For an Nsight Systems timeline (where nsys exists):
    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx,cublas \\
        -o tgolf_profile python -m tgolf.profile --preset baseline --steps 6 --nsys-steps 3:4 --out prof
(under nsys the torch.profiler trace is skipped: both would use CUPTI.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tgolf.config import add_config_arguments, parse_step_range, resolve_config
from tgolf.profile.env import collect_env
from tgolf.profile.report import summarize, write_report
from tgolf.profile.trace import analyze, load_events, load_trace, trace_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tgolf.profile", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untraced steps first (compilation, autotuning)")
    parser.add_argument("--out", default="profile_out", help="output folder")
    parser.add_argument("--nsys-steps", default=None, metavar="A:B",
                        help="call cudaProfilerStart before step A and Stop after step B (steps counted from 0, "
                             "warm-up included)")
    parser.add_argument("--from-trace", default=None, metavar="FILE",
                        help="build the report from a recorded chrome trace (.json or .json.gz) instead of running; "
                             "run.json beside it, if any, supplies the model FLOPs and the run's machine and versions")
    parser.add_argument("--no-charts", action="store_true")
    add_config_arguments(parser)
    return parser


def _nsys_range(text: str | None, first: int, last: int) -> tuple[int, int] | None:
    steps = parse_step_range(text or "", "--nsys-steps")
    if steps is None:
        return None
    a, b = steps
    if not first <= a <= b <= last:
        raise ValueError(f"--nsys-steps {text}: must satisfy {first} <= A <= B <= {last} (profiled steps)")
    return a, b


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m tgolf.profile", *(sys.argv[1:] if argv is None else argv)])
    env = collect_env(command)
    if args.from_trace:
        trace = Path(args.from_trace)
        meta_path = trace.parent / "run.json"
        recorded = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta = recorded.get("meta", {})
        events, info = load_trace(trace)
        # the header describes the run, not this machine: its own record, else what the trace says
        run_env = {**recorded["env"], "source": "run.json"} if recorded.get("env") else trace_env(info, events)
        summary = summarize(analyze(events), {**meta, "trace": str(trace)}, meta.get("step_ms_host"), run_env)
        samples = recorded.get("telemetry_samples", [])
        print(write_report(summary, env, samples, out, charts=not args.no_charts).read_text())
        return 0

    from tgolf.profile.run import profile_training

    try:
        cfg = resolve_config(args)
        if args.steps < 1 or args.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")
        nsys = _nsys_range(args.nsys_steps, args.warmup, args.warmup + args.steps - 1)
    except ValueError as err:
        print(f"tgolf.profile: {err}", file=sys.stderr)
        return 2
    result = profile_training(cfg, args.steps, args.warmup, out, nsys,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    (out / "run.json").write_text(json.dumps({"meta": {**result.meta, "step_ms_host": result.step_ms}, "env": env},
                                             indent=1) + "\n")
    analysis = analyze(load_events(result.trace_path)) if result.trace_path else None
    summary = summarize(analysis, {**result.meta, "trace": str(result.trace_path)}, result.step_ms)
    print(write_report(summary, env, result.telemetry, out, charts=not args.no_charts).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
