"""Benchmark results as JSON (everything) and a markdown table (one row per op, size and mode)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tgolf.bench.limits import H100_HBM_BYTES_PER_S, H100_NAME, H100_PEAK_FLOPS


def limits_block() -> dict:
    return {"name": H100_NAME, "peak_flops": H100_PEAK_FLOPS, "hbm_bytes_per_s": H100_HBM_BYTES_PER_S}


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    def clean(value):  # JSON has no inf/nan: write them as strings
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    path.write_text(json.dumps(clean({"meta": meta, "limits": limits_block(), "rows": rows}), indent=1) + "\n")


def read_json(path: Path) -> tuple[dict, list[dict]]:
    """(meta, rows) of a bench.json written by :func:`write_json`; ``path`` may be the file or its folder."""
    path = path / "bench.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
        return data["meta"], list(data["rows"])
    except FileNotFoundError:
        raise ValueError(f"{path}: no such benchmark results (expected a bench.json or its folder)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a tgolf bench.json ({type(exc).__name__}: {exc})") from None


def measured_stamp(meta: dict) -> dict:
    """When and at which commit a run measured its rows; a resumed run's kept rows carry their own."""
    return {"date_utc": meta.get("date_utc"), "git_commit": meta.get("git_commit")}


def _status_text(row: dict, meta: dict) -> str:
    """The row's status, and the commit it was measured at where that is not this run's (a row kept by --resume
    from a run of an older commit)."""
    commit = (row.get("measured") or {}).get("git_commit")
    older = f" (measured at commit {commit})" if commit and commit != meta.get("git_commit") else ""
    return row["status"].replace("|", "/") + older


def _cut_by_budget(row: dict) -> bool:
    return row["status"] == "skipped: time budget" or any(
        entry.get("status") == "skipped: time budget" for entry in row.get("anchors", {}).values())


def finished_cases(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by case (op, size) for the cases that a time budget did not cut, in full or in an anchor: those a
    resumed run keeps instead of measuring again."""
    by_case: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_case.setdefault((row["op"], row.get("size", "")), []).append(row)
    return {key: case_rows for key, case_rows in by_case.items() if not any(map(_cut_by_budget, case_rows))}


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _mib(entry: dict) -> str:
    peak = entry.get("peak_bytes")
    return "" if peak is None else f", {peak / 2**20:.0f} MiB"


def _graph(entry: dict, key: str, fmt: str, unit: str) -> str:
    value = entry.get(key)
    return "" if value is None else f"; graph {value:{fmt}}{unit}"


def _anchor_text(name: str, entry: dict) -> str:
    if entry.get("status") != "ok":
        return f"{name}: {entry.get('status', '?')}"
    return (f"{name} {entry['median_ms']:.3f} ms ({entry['speedup']:.2f}×{_graph(entry, 'graph_speedup', '.2f', '×')}"
            f"{_mib(entry)})")


def _time_text(row: dict) -> str:
    t = row.get("time")
    if not t:
        return ""
    graph = _graph(t, "graph_ms", ".3f", "") or ("; graph: not capturable" if t.get("graph_status") else "")
    return f"{t['median_ms']:.3f} ± {(t['q75_ms'] - t['q25_ms']) / 2:.3f}{graph}{_mib(t)}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# tgolf benchmarks — {meta.get('device_name', '?')} ({meta.get('device', '?')})",
        "",
        f"{meta.get('date_utc', '')} · torch {meta.get('torch')} · triton {meta.get('triton')} · "
        f"commit {meta.get('git_commit')} · shapes `{meta.get('shapes')}`",
        "",
        f"`{meta.get('command', '')}`",
        "",
        "Time: median ± half the interquartile range over the repetitions (ms). Speedup in brackets: anchor "
        "time / tgolf time (> 1: tgolf faster); graph: the same calls replayed from CUDA graphs (GPU time without the "
        "host's launch overhead) and their ratio; MiB: the device memory one call allocates at its peak. % of peak: "
        "against the "
        f"{H100_NAME} limits (bf16 {H100_PEAK_FLOPS['bf16'] / 1e12:.0f}, fp8/int8 "
        f"{H100_PEAK_FLOPS['int8'] / 1e12:.0f} TFLOP/s; {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s). "
        "A row that failed its correctness check has no time.",
        "",
        "| op | size | dtype | mode | status | backend | rel err | time ms | TFLOP/s | GB/s | % peak FLOP/s "
        "| % peak BW | anchors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        anchors = "; ".join(_anchor_text(n, e) for n, e in r.get("anchors", {}).items())
        err = r.get("rel_err")
        lines.append("| " + " | ".join([
            r["op"], r.get("size", ""), r.get("dtype", ""), r.get("mode", ""), _status_text(r, meta),
            str(r.get("backend") or ""), "" if err is None else f"{err:.2e}", _time_text(r),
            _num(r.get("tflops"), ".1f"), _num(r.get("gbps"), ".0f"), _num(r.get("pct_peak_flops"), ".1f"),
            _num(r.get("pct_peak_bw"), ".1f"), anchors.replace("|", "/"),
        ]) + " |")
    return "\n".join(lines) + "\n"
