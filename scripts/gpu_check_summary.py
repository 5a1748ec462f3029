"""The short summary table that scripts/gpu_check.sh prints last: one line per step, then the key numbers.

    python scripts/gpu_check_summary.py profiles/<date>-<device> [TOTAL_SECONDS]
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _tail(path: Path, pattern: str) -> str:
    """The last line of ``path`` matching ``pattern`` (regex), stripped; '' when none."""
    if not path.exists():
        return ""
    hits = [line.strip() for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
    return hits[-1][:160] if hits else ""


def _bench(folder: Path) -> tuple[str, list[str]]:
    path = folder / "bench" / "bench.json"
    if not path.exists():
        return "no bench.json", []
    data = json.loads(path.read_text())
    rows, meta = data["rows"], data.get("meta", {})
    counts: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    lines = [f"## Benchmarks: {meta.get('shapes', '?')} shapes on {meta.get('device', '?')}", "",
             "| op | size | mode | status | ms | TFLOP/s | % peak | vs anchors (×, > 1 = tgolf faster) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("time") or {}
        ratios = ", ".join(f"{n} {e['speedup']:.2f}" + (f" (graph {e['graph_speedup']:.2f})"
                                                        if e.get("graph_speedup") else "")
                           for n, e in r.get("anchors", {}).items() if e.get("status") == "ok" and e.get("speedup"))
        status = r["status"] if len(r["status"]) < 60 else r["status"][:57] + "..."
        commit = (r.get("measured") or {}).get("git_commit")
        if commit and commit != meta.get("git_commit"):  # kept by --resume from an earlier session's run
            status += f" (commit {commit})"
        lines.append(f"| {r['op']} | {r.get('size', '')} | {r.get('mode', '')} | {status.replace('|', '/')} | "
                     f"{t.get('median_ms', 0):.3f} | {r.get('tflops') or 0:.0f} | {r.get('pct_peak_flops') or 0:.0f} | "
                     f"{ratios} |" if t else
                     f"| {r['op']} | {r.get('size', '')} | {r.get('mode', '')} | {status.replace('|', '/')} | | | | |")
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), lines


def _profile(folder: Path, name: str = "profile") -> str:
    path = folder / name / "profile.json"
    if not path.exists():
        return "no profile.json"
    p = json.loads(path.read_text())
    parts = []
    if "mean_step_ms" in p:
        parts.append(f"step {p['mean_step_ms']:.1f} ms")
    if "mfu_pct" in p:
        parts.append(f"MFU {p['mfu_pct']:.1f}%")
    shares = sorted(p.get("share_pct", {}).items(), key=lambda kv: -kv[1])[:4]
    parts += [f"{k} {v:.0f}%" for k, v in shares]
    idle = list(p.get("idle_by_host_ms", {}).items())[:3]  # largest first: what the GPU waited on
    if idle:
        parts.append("idle in " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in idle))
    return ", ".join(parts)


def _train(folder: Path) -> str:
    path = folder / "train" / "baseline" / "summary.json"
    if not path.exists():
        return _tail(folder / "train.log", r"Error|error")
    t = json.loads(path.read_text())
    return (f"val_bpb {t['val_bpb']:.4f} (roundtrip {t['roundtrip_val_bpb']:.4f}), {t['steps']} steps in "
            f"{t['train_seconds']:.0f} s, {t['step_ms']:.0f} ms/step, {t['tokens_per_second']:,.0f} tokens/s, "
            f"peak {t['peak_memory_bytes'] / 2**30:.1f} GiB, artifact {t['artifact_bytes']:,} B (code "
            f"{t['code_bytes']:,} B, {t.get('code_pack', 'none')})")


def _tune(folder: Path) -> str:
    path = folder / "tune" / "tune.json"
    if not path.exists():
        return "no tune.json"
    rows = json.loads(path.read_text())["rows"]
    gains = [f"{r['kernel']} K{r['K']} N{r['N']} {r['speedup_over_default']:.2f}×" for r in rows
             if r.get("speedup_over_default")]
    return f"{len(rows)} kernel shapes; best tile / default: " + (", ".join(gains) if gains else "none timed")


def summary(folder: Path, total_s: str) -> str:
    env = json.loads((folder / "env.json").read_text()) if (folder / "env.json").exists() else {}
    bench_counts, bench_lines = _bench(folder)
    results = {
        "install": _tail(folder / "install.log", r"Successfully installed|error|Error") or "see install.log",
        "info": _tail(folder / "info.txt", r"CUDA extension"),
        "restore-caches": _tail(folder / "restore_caches.log", r"entries"),
        "pytest-gpu": _tail(folder / "pytest.log", r"passed|failed|error|skipped|deselected|no tests ran"),
        "bench": bench_counts,
        "bench-more": bench_counts,
        "bench-resume": bench_counts,
        "tune": _tune(folder),
        "profile": _profile(folder),
        "profile-mix-order-on": _profile(folder, "profile-mix-order-on"),
        "profile-recurrence-lanes": _profile(folder, "profile-recurrence-lanes"),
        "profile-cuda-graphs": _profile(folder, "profile-cuda-graphs"),
        "memcheck": _tail(folder / "memcheck.log", r"ERROR SUMMARY|Error|error"),
        "train": _train(folder),
    }
    lines = [f"# tgolf GPU check — {env.get('device_name', '?')}", "",
             f"{env.get('date_utc', '')} · driver {env.get('driver', '?')} · torch {env.get('torch')} · "
             f"triton {env.get('triton')} · commit {env.get('git_commit')} · total {total_s} s", ""]
    lines += [*bench_lines, ""]
    lines += ["## Steps", "", "| step | status | s | result |", "|---|---|---|---|"]
    steps = folder / "steps.tsv"
    for row in (steps.read_text().splitlines() if steps.exists() else []):
        name, status, secs, _log = (row.split("\t") + ["", "", "", ""])[:4]
        result = "" if status.startswith("skipped") else results.get(name, "").replace("|", "/")
        lines.append(f"| {name} | {status} | {secs} | {result} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    print(summary(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else "?"), end="")
