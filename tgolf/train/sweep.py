"""Compare training runs at equal wall time: one ``tgolf.train`` run per cell of a grid of Config values.

    python -m tgolf.train.sweep --grid attention=softmax,linear,hybrid --grid train_seq_len=1024,8192 \\
        --seconds 60 --out sweeps/attention -- --data-path .data/shards --warmup-steps 3

Every cell gets the same training seconds (``--max-wallclock-seconds``) and the flags after ``--``; each runs in its
own process (so no compiled graph, cache or memory is shared) and writes ``OUT/runs/<cell>/``. The table ranks the
cells by val_bpb beside their tokens/s, step time and peak memory: ``sweep.json`` and ``sweep.md`` in OUT.
All cells are checked as configurations before the first one starts; a cell whose ``summary.json`` exists is
reused, not rerun (``--rerun`` reruns it); a failed cell is reported and the others still run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgolf.config import Config, field_types, parse_value

_FIELD_TYPES = field_types()

SUMMARY_FIELDS = ("val_bpb", "roundtrip_val_bpb", "tokens_per_second", "step_ms", "steps", "stopped_by",
                  "train_seconds", "peak_memory_bytes", "params", "artifact_bytes")


@dataclass(frozen=True)
class Cell:
    values: tuple[tuple[str, str], ...]  # (Config field, value as typed) in grid order

    @property
    def name(self) -> str:
        """The run id and folder name: field-value pairs, with anything but letters, digits, '.' and '-' as '_'."""
        return "_".join(f"{field}-{re.sub(r'[^A-Za-z0-9.-]+', '_', value).strip('_')}"
                        for field, value in self.values) or "base"

    def flags(self) -> list[str]:
        """tgolf.train's flags for the cell; a bool field is a switch: ``--ln-scale`` / ``--no-ln-scale``."""
        out: list[str] = []
        for field, value in self.values:
            flag = field.replace("_", "-")
            if _FIELD_TYPES[field] is bool:
                out.append(("--" if parse_value(bool, value, f"--grid {field}") else "--no-") + flag)
            else:
                out += ["--" + flag, value]
        return out


def parse_grid(specs: list[str]) -> list[Cell]:
    """``field=v1,v2`` per spec → the cross product, first spec outermost. Field names are Config's."""
    known = set(Config.__dataclass_fields__)
    axes: list[list[tuple[str, str]]] = []
    for spec in specs:
        field, sep, values = spec.partition("=")
        field = field.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--grid {spec!r}: expected FIELD=VALUE[,VALUE...]")
        if field not in known:
            raise ValueError(f"--grid {spec!r}: {field!r} is not a Config field")
        axis = [(field, v.strip()) for v in values.split(",") if v.strip()]
        if _FIELD_TYPES[field] is bool:  # a typo here would otherwise only fail when its cell's flags are built
            for _, value in axis:
                parse_value(bool, value, f"--grid {field}")
        axes.append(axis)
    if len({axis[0][0] for axis in axes}) != len(axes):
        raise ValueError("--grid: a field is given twice")
    cells = [Cell(tuple(combo)) for combo in itertools.product(*axes)]
    if len({c.name for c in cells}) != len(cells):
        raise ValueError("--grid: two cells would share a run folder (repeated values, or values that differ only in "
                         "characters a folder name cannot hold)")
    return cells


def cell_argv(cell: Cell, base: list[str], seconds: float, out: Path) -> list[str]:
    # The cell's values come last so they win over the shared flags.
    return [*base, "--max-wallclock-seconds", str(seconds), "--out-dir", str(out / "runs"), "--run-id", cell.name,
            *cell.flags()]


def check_cells(cells: list[Cell], base: list[str], seconds: float, out: Path) -> None:
    """Resolve every cell's configuration now, so a typo fails before any GPU time is spent."""
    from tgolf.config import resolve_config
    from tgolf.train.__main__ import build_parser

    parser = build_parser()
    parser.exit_on_error = False  # argument errors raise instead of exiting
    for cell in cells:
        try:
            args, unknown = parser.parse_known_args(cell_argv(cell, base, seconds, out))
            if unknown:
                raise ValueError(f"unrecognized tgolf.train flags {unknown}")
            resolve_config(args)
        except (argparse.ArgumentError, ValueError) as err:
            raise ValueError(f"cell {cell.name}: {err}") from None


def run_cell(cell: Cell, base: list[str], seconds: float, out: Path, rerun: bool) -> dict[str, Any]:
    run_dir = out / "runs" / cell.name
    summary_path = run_dir / "summary.json"
    row: dict[str, Any] = {"cell": cell.name, **dict(cell.values)}
    if summary_path.exists() and not rerun:
        print(f"sweep: {cell.name}: reusing {summary_path}", flush=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "tgolf.train", *cell_argv(cell, base, seconds, out)]
        print(f"sweep: {cell.name}: {' '.join(argv[1:])}", flush=True)
        with open(run_dir / "stdout.log", "w") as log:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = (run_dir / "stdout.log").read_text(errors="replace").strip().splitlines()[-1:]
            return {**row, "status": f"failed (rc {rc})", "error": tail[0] if tail else ""}
    summary = json.loads(summary_path.read_text())
    return {**row, "status": "ok", **{k: summary.get(k) for k in SUMMARY_FIELDS}}


def markdown(rows: list[dict[str, Any]], fields: list[str], seconds: float) -> str:
    ranked = sorted(rows, key=lambda r: (r["status"] != "ok", r.get("val_bpb") or 0.0))
    head = [*fields, "val_bpb", "roundtrip", "tokens/s", "step ms", "steps", "train s", "stopped by", "peak GiB",
            "params", "status"]
    lines = [f"Equal wall time: at most {seconds:g} s of training per cell (\"stopped by\" says what ended each); "
             "ranked by val_bpb.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranked:
        ok = r["status"] == "ok"
        numbers = ([f"{r['val_bpb']:.4f}", f"{r['roundtrip_val_bpb']:.4f}", f"{r['tokens_per_second']:,.0f}",
                    f"{r['step_ms']:.1f}", str(r["steps"]), f"{r['train_seconds']:.1f}", str(r["stopped_by"]),
                    f"{(r['peak_memory_bytes'] or 0) / 2**30:.1f}", f"{r['params']:,}"] if ok else [""] * 9)
        lines.append("| " + " | ".join([*(str(r[f]) for f in fields), *numbers, r["status"]]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, base = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m tgolf.train.sweep", description=__doc__.split("\n\n")[0],
                                     epilog="Flags after -- go to every tgolf.train run.")
    parser.add_argument("--grid", action="append", required=True, metavar="FIELD=V1,V2",
                        help="a Config field and its values; repeat for a cross product")
    parser.add_argument("--seconds", type=float, required=True, help="training seconds per cell")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--rerun", action="store_true", help="rerun cells that already have a summary.json")
    args = parser.parse_args(own)
    try:
        if args.seconds <= 0:
            raise ValueError(f"--seconds {args.seconds:g}: must be > 0")
        cells = parse_grid(args.grid)
        check_cells(cells, base, args.seconds, args.out)
    except ValueError as err:
        print(f"tgolf.train.sweep: {err}", file=sys.stderr)
        return 2
    rows = [run_cell(cell, base, args.seconds, args.out, args.rerun) for cell in cells]
    fields = [field for field, _ in cells[0].values]
    (args.out / "sweep.json").write_text(json.dumps({"seconds": args.seconds, "flags": base, "rows": rows},
                                                    indent=2) + "\n")
    table = markdown(rows, fields, args.seconds)
    (args.out / "sweep.md").write_text(table)
    print(table, end="")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
