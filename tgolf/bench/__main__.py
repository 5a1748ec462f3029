"""``python -m tgolf.bench --ops NAMES --shapes contest|sweep|quick --device cuda|cpu --out DIR``."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from tgolf.bench.core import RunOptions, run_cases
from tgolf.bench.plots import write_plots
from tgolf.bench.registry import FAMILIES, SHAPE_SETS, collect
from tgolf.bench.report import finished_cases, markdown, measured_stamp, read_json, write_json
from tgolf.profile.env import collect_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tgolf.bench",
        description="Correctness-checked microbenchmarks of tgolf's ops beside their anchors (cuBLAS, eager and "
                    "compiled references, SDPA flash, fla). Writes bench.json, bench.md and bench_<family>.png.")
    parser.add_argument("--ops", default="", help=f"comma-separated families ({', '.join(FAMILIES)}) or "
                        "<family>.<op> names; default: all")
    parser.add_argument("--shapes", choices=SHAPE_SETS, default="contest",
                        help="quick: tiny (CPU tests); contest: the contest's shapes; sweep: more sizes")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out", help="output folder")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds; cases starting after it are reported as skipped (0 = no limit)")
    parser.add_argument("--resume", default="", metavar="PATH",
                        help="an earlier bench.json (or its folder) of the same shapes and device: keep its cases "
                             "that the time budget did not cut and measure only the rest")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile anchors")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _resumed(path: Path, shapes: str, device: torch.device) -> tuple[dict[tuple[str, str], list[dict]],
                                                                     set[tuple[str, str]]]:
    """The finished cases of an earlier run, which must have measured the same shape set on the same device (the
    same GPU model), each row stamped with the commit it was measured at; and the cases its budget cut."""
    meta, rows = read_json(path)
    if (meta.get("shapes"), meta.get("device")) != (shapes, device.type):
        raise ValueError(f"{path}: measured --shapes {meta.get('shapes')} on {meta.get('device')}, "
                         f"not --shapes {shapes} on {device.type}")
    here = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if here is not None and meta.get("device_name") != here:
        raise ValueError(f"{path}: measured on {meta.get('device_name')}, not on this {here}")
    for row in rows:
        row.setdefault("measured", measured_stamp(meta))
    finished = finished_cases(rows)
    return finished, {(r["op"], r.get("size", "")) for r in rows} - set(finished)


def _from_older_commits(done: dict[tuple[str, str], list[dict]], commit: str | None) -> set[tuple[str, str]]:
    """The kept cases measured at another commit than this run's: measured again if the time budget allows (the
    code may have changed since), kept otherwise."""
    return {key for key, rows in done.items() if any(r["measured"].get("git_commit") != commit for r in rows)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tgolf.bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    try:
        cases, failed = collect(names, args.shapes)
    except ValueError as err:
        print(f"tgolf.bench: {err}", file=sys.stderr)
        return 2
    try:
        done, cut = _resumed(Path(args.resume), args.shapes, device) if args.resume else ({}, set())
    except ValueError as err:
        print(f"tgolf.bench: --resume {err}", file=sys.stderr)
        return 2
    quick_cpu = device.type == "cpu" and args.shapes == "quick"
    start = time.monotonic()
    opts = RunOptions(device=device, quick=args.shapes == "quick", seed=args.seed,
                      compile_anchors=not (args.no_compile or quick_cpu),
                      deadline=start + args.time_budget if args.time_budget > 0 else math.inf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m tgolf.bench", *(sys.argv[1:] if argv is None else argv)])
    meta = {**collect_env(command), "shapes": args.shapes}
    if done:
        meta["resumed_from"] = args.resume  # rows of the cases it kept carry that run's figures
    meta["device"] = device.type  # the device benchmarked, not merely the one present

    def save(rows: list[dict]) -> str:
        meta["seconds"] = round(time.monotonic() - start, 1)
        for row in rows:
            row.setdefault("measured", measured_stamp(meta))
        reached = {(r["op"], r.get("size", "")) for r in rows}  # a run stopped midway keeps the rest it resumed
        rows = rows + [r for key, kept in done.items() if key not in reached for r in kept]
        write_json(out / "bench.json", meta, failed + rows)
        table = markdown(meta, failed + rows)
        (out / "bench.md").write_text(table)
        return table

    save([])  # from the start: the failed families and, when resuming, the kept rows
    rows = run_cases(cases, opts, progress=lambda msg: print(msg, file=sys.stderr, flush=True), on_rows=save,
                     done=done, retry_last=cut, refresh=_from_older_commits(done, meta.get("git_commit")))
    table = save(rows)
    if not args.no_plots:
        write_plots(failed + rows, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
