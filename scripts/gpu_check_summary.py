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


def _pytest(folder: Path) -> str:
    """pytest's closing line; where its step was cut before it, the outcomes the -v log had reached."""
    path = folder / "pytest.log"
    if not path.exists():
        return ""
    text = path.read_text(errors="replace")
    closing = re.findall(r"^=+ (.*(?:passed|failed|error|skipped|deselected|no tests ran).*) =+$", text, re.M)
    if closing:
        return closing[-1]
    outcomes = re.findall(r"^(?:\[gw\d+\] )?\[ *\d+%\] (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text, re.M)
    if not outcomes:
        outcomes = re.findall(r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?: +\[ *\d+%\])?$", text, re.M)
    collected = re.search(r"(?:collected|\[)(\d+) items", text)
    counts = ", ".join(f"{outcomes.count(o)} {o.lower()}" for o in dict.fromkeys(outcomes))
    return f"cut before the end: {counts or 'no outcome'}" + (f" of {collected[1]}" if collected else "")


def _failures(folder: Path) -> list[str]:
    """One line per failed test from pytest_failures.txt (tests/_failure_log.py): its id and its last E line."""
    path = folder / "pytest_failures.txt"
    if not path.exists():
        return []
    lines = []
    for block in path.read_text(errors="replace").split("==== ")[1:]:
        head, _, body = block.partition("\n")
        errors = [line[1:].strip() for line in body.splitlines() if line.startswith("E ")]
        why = (errors[-1] if errors else "see pytest_failures.txt")[:200]
        lines.append(f"- `{head.strip()}`: {why}".replace("|", "/"))
    return lines


def summary(folder: Path, total_s: str) -> str:
    env = json.loads((folder / "env.json").read_text()) if (folder / "env.json").exists() else {}
    bench_counts, bench_lines = _bench(folder)
    results = {
        "install": _tail(folder / "install.log", r"Successfully installed|error|Error") or "see install.log",
        "info": _tail(folder / "info.txt", r"CUDA extension"),
        "restore-caches": _tail(folder / "restore_caches.log", r"entries"),
        "pytest-gpu": _pytest(folder),
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
    failures = _failures(folder)
    if failures:
        lines += ["", "## Test failures (pytest_failures.txt has the tracebacks)", "", *failures]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    print(summary(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else "?"), end="")
