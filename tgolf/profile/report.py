"""The profile report: where each step's time went, MFU, memory, telemetry; markdown, JSON and PNG charts."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tgolf.bench.limits import H100_NAME, peak_flops  # noqa: E402
from tgolf.profile.categories import CATEGORIES, IDLE  # noqa: E402
from tgolf.profile.trace import TraceAnalysis  # noqa: E402

ORDER = (*CATEGORIES, IDLE)


def summarize(analysis: TraceAnalysis | None, meta: dict, step_ms: list[float] | None) -> dict:
    """One JSON-able dict; category totals (idle included) add up to the traced step time."""
    out: dict = {"meta": meta, "step_ms_host": step_ms}
    if analysis is not None:
        totals = analysis.totals()
        n = len(analysis.steps)
        out.update(
            source=analysis.source,
            steps=[{"step": s.step, "ms": s.ms, "categories": s.categories} for s in analysis.steps],
            total_ms=analysis.total_ms,
            totals_ms=totals,
            mean_step_ms=analysis.total_ms / n,
            mean_ms_per_category={c: totals[c] / n for c in ORDER},
            share_pct={c: 100 * totals[c] / analysis.total_ms if analysis.total_ms else 0.0 for c in ORDER},
            top=[{"category": c, "name": name, "ms": ms} for c, name, ms in analysis.top],
        )
    step_s = (out.get("mean_step_ms") or (statistics.median(step_ms) if step_ms else 0.0)) / 1e3
    flops = meta.get("flops_per_step")
    if flops and step_s > 0:
        out["achieved_tflops"] = flops / step_s / 1e12
        if meta.get("device") == "cuda":
            out["mfu_pct"] = 100 * flops / step_s / peak_flops("bf16")
    return out


def _fmt(value, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(summary: dict, env: dict) -> str:
    meta = summary["meta"]
    lines = [f"# tgolf profile — {env.get('device_name', '?')}", "",
             f"{env.get('date_utc', '')} · torch {env.get('torch')} · triton {env.get('triton')} · "
             f"driver {env.get('driver', '—')} · commit {env.get('git_commit')}", "", f"`{env.get('command', '')}`", ""]
    if meta.get("params"):
        lines += [f"- model: {meta['params']:,} parameters; {meta.get('tokens_per_step', 0):,} tokens per step in "
                  f"{meta.get('grad_accum_steps')} micro-batches; data: {meta.get('data')}",
                  f"- config: {meta.get('preset_config')}"]
    if "mean_step_ms" in summary:
        lines.append(f"- mean traced step: {summary['mean_step_ms']:.2f} ms over {len(summary['steps'])} steps "
                     f"(busy = {summary['source'].upper()} events; idle = step time − busy)")
    if summary.get("step_ms_host"):
        lines.append(f"- host-clock steps (ms): {', '.join(f'{t:.1f}' for t in summary['step_ms_host'])}")
    if "achieved_tflops" in summary:
        mfu = f"; MFU {summary['mfu_pct']:.1f}% of {H100_NAME} bf16 peak" if "mfu_pct" in summary else ""
        lines.append(f"- model FLOPs (6·params·tokens + causal attention): {summary['achieved_tflops']:.3g} "
                     f"TFLOP/s{mfu}")
    memory = {k: v for k, v in meta.items() if k.startswith("peak_")}
    if memory:
        lines.append("- memory: " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items()))
    tele = meta.get("telemetry") or {}
    if tele.get("samples"):
        parts = [f"{k} {tele[k]['min']:.0f}/{tele[k]['median']:.0f}/{tele[k]['max']:.0f}"
                 for k in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "gpu_util_pct") if k in tele]
        lines.append("- GPU telemetry (min/median/max): " + ", ".join(parts))
    elif tele.get("error"):
        lines.append(f"- {tele['error']}")
    if "totals_ms" in summary:
        lines += ["", "| category | ms per step | share |", "|---|---|---|"]
        for c in ORDER:
            lines.append(f"| {c} | {summary['mean_ms_per_category'][c]:.3f} | {summary['share_pct'][c]:.1f}% |")
        lines.append(f"| **total** | {summary['mean_step_ms']:.3f} | 100.0% |")
        lines += ["", "| step | ms | " + " | ".join(ORDER) + " |", "|---" * (len(ORDER) + 2) + "|"]
        for s in summary["steps"]:
            lines.append(f"| {s['step']} | {s['ms']:.2f} | " + " | ".join(f"{s['categories'][c]:.2f}" for c in ORDER)
                         + " |")
        lines += ["", "Top kernels/operators by attributed time (all traced steps):", "",
                  "| category | name | ms |", "|---|---|---|"]
        for t in summary["top"]:
            name = t["name"].replace("|", "/")
            lines.append(f"| {t['category']} | `{name[:110]}` | {t['ms']:.3f} |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_charts(summary: dict, telemetry: list[dict], out_dir: Path) -> list[Path]:
    written = []
    if "steps" in summary:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        steps = summary["steps"]
        bottom = [0.0] * len(steps)
        for c in ORDER:
            values = [s["categories"][c] for s in steps]
            ax1.bar([str(s["step"]) for s in steps], values, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax1.set_xlabel("step")
        ax1.set_ylabel("ms")
        ax1.set_title(f"time by category ({summary['source']} busy time; idle = rest)")
        ax1.legend(fontsize=7, ncol=2)
        shares = summary["mean_ms_per_category"]
        ax2.barh(list(ORDER), [shares[c] for c in ORDER])
        ax2.set_xlabel("ms per step (mean)")
        ax2.invert_yaxis()
        written.append(_save(fig, out_dir / "profile_categories.png"))
    host = summary.get("step_ms_host")
    if host or "steps" in summary:
        fig, ax = plt.subplots(figsize=(7, 4))
        if host:
            ax.plot(range(len(host)), host, marker="o", label="host clock")
        if "steps" in summary:
            ax.plot(range(len(summary["steps"])), [s["ms"] for s in summary["steps"]], marker="x", label="trace window")
        ax.set_xlabel("profiled step")
        ax.set_ylabel("ms")
        ax.set_title("step time")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out_dir / "profile_steps.png"))
    if telemetry:
        keys = ("sm_clock_mhz", "power_w", "temperature_c", "gpu_util_pct")
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
        t = [s["t_s"] for s in telemetry]
        for ax, key in zip(axes, keys):
            ax.plot(t, [s[key] for s in telemetry])
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("s")
            ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "profile_telemetry.png"))
    return written


def write_report(summary: dict, env: dict, telemetry: list[dict], out_dir: Path, charts: bool = True) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps({"env": env, **summary}, indent=1) + "\n")
    md = markdown(summary, env)
    (out_dir / "profile.md").write_text(md)
    if charts:
        write_charts(summary, telemetry, out_dir)
    return out_dir / "profile.md"
