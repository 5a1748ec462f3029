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
OUTLIER_FACTOR = 2.0
OUTLIER_RULE = (f"a step over {OUTLIER_FACTOR:g}× the median of the other steps is left out of the means, shares "
                "and MFU (one-off start-up: the profiler starting, or a recompilation in the window's first step)")


def slow_outliers(ms: list[float], factor: float = OUTLIER_FACTOR) -> list[int]:
    """Indices of the steps slower than ``factor``× the median of the other steps.

    A profiled window's first step can carry one-off costs a steady run does not pay: CUPTI starting, and a
    torch.compile recompilation when switching the ranges on changes what the compiled code guarded on (both seen on
    an H100 trace: 1959 ms against ~400 ms). Comparing with the *other* steps lets two-step windows be checked too,
    and the fastest step is never flagged, so some step always remains.
    """
    if len(ms) < 2:
        return []
    return [i for i, t in enumerate(ms) if t > factor * statistics.median(ms[:i] + ms[i + 1:])]


def summarize(analysis: TraceAnalysis | None, meta: dict, step_ms: list[float] | None,
              run_env: dict | None = None) -> dict:
    """One JSON-able dict; the kept steps' category totals (idle included) add up to their traced step time.

    ``run_env`` describes the machine the steps ran on, when that is not the one writing the report."""
    out: dict = {"meta": meta, "step_ms_host": step_ms, "outlier_rule": OUTLIER_RULE}
    if run_env:
        out["run_env"] = run_env
    step_s = 0.0
    if step_ms:
        host_out = slow_outliers(step_ms)
        host_kept = [t for i, t in enumerate(step_ms) if i not in host_out]
        out.update(host_median_ms=statistics.median(step_ms), host_mean_kept_ms=statistics.fmean(host_kept),
                   host_excluded=host_out)
        step_s = out["host_mean_kept_ms"] / 1e3
    if analysis is not None:
        excluded = slow_outliers([s.ms for s in analysis.steps])
        kept = [s for i, s in enumerate(analysis.steps) if i not in excluded]
        n = len(kept)
        total = sum(s.ms for s in kept)
        totals = {c: sum(s.categories[c] for s in kept) for c in ORDER}
        kernels: dict[tuple[str, str], float] = {}
        for s in kept:
            for key, ms in s.kernels.items():
                kernels[key] = kernels.get(key, 0.0) + ms
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
        idle_by_host: dict[str, float] = {}
        for s in kept:
            for name, ms in s.idle_by_host.items():
                idle_by_host[name] = idle_by_host.get(name, 0.0) + ms
        out.update(
            source=analysis.source,
            steps=[{"step": s.step, "ms": s.ms, "categories": s.categories, "excluded": i in excluded}
                   for i, s in enumerate(analysis.steps)],
            excluded_steps=[analysis.steps[i].step for i in excluded],
            kept_steps=n,
            total_ms=total,
            totals_ms=totals,
            mean_step_ms=total / n,
            median_step_ms=statistics.median(s.ms for s in analysis.steps),
            mean_ms_per_category={c: totals[c] / n for c in ORDER},
            share_pct={c: 100 * totals[c] / total if total else 0.0 for c in ORDER},
            top=[{"category": c, "name": name, "ms_per_step": ms / n} for (c, name), ms in ranked],
            idle_by_host_ms={name: ms / n for name, ms in sorted(idle_by_host.items(), key=lambda kv: -kv[1])},
        )
        step_s = out["mean_step_ms"] / 1e3
    flops = meta.get("flops_per_step")
    if flops and step_s > 0:
        out["achieved_tflops"] = flops / step_s / 1e12
        if meta.get("device") == "cuda":
            out["mfu_pct"] = 100 * flops / step_s / peak_flops("bf16")
    return out


def _fmt(value, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


_TRACE_ONLY = (" (from the trace: torch.profiler records the device and CUDA versions, not torch's, triton's or "
               "the commit)")


def _header(summary: dict, env: dict) -> list[str]:
    """Title and provenance: the machine and software the steps ran on (the run's own record when the report is
    rebuilt from a trace), then, if it differs, who built the report and when."""
    run = summary.get("run_env") or env
    driver = run.get("driver") or (f"CUDA driver API {run['cuda_driver_api']}" if run.get("cuda_driver_api") else None)
    versions = " · ".join(f"{label} {_fmt(run.get(key) if key else driver, '')}" for label, key in
                          (("torch", "torch"), ("triton", "triton"), ("driver", None), ("commit", "git_commit")))
    source = _TRACE_ONLY if run.get("source") == "trace" else ""
    lines = [f"# tgolf profile — {run.get('device_name') or '?'}", "",
             f"{run.get('date_utc', '—')} · {versions}{source}", ""]
    if run.get("command"):
        lines += [f"`{run['command']}`", ""]
    if run is not env:
        lines += [f"report built {env.get('date_utc')} on {env.get('device_name')} (torch {env.get('torch')}, commit "
                  f"{env.get('git_commit')}): `{env.get('command')}`", ""]
    return lines


def markdown(summary: dict, env: dict) -> str:
    meta = summary["meta"]
    lines = _header(summary, env)
    if meta.get("params"):
        lines += [f"- model: {meta['params']:,} parameters; {meta.get('tokens_per_step', 0):,} tokens per step in "
                  f"{meta.get('grad_accum_steps')} micro-batches; data: {meta.get('data')}",
                  f"- config: {meta.get('preset_config')}"]
    if "mean_step_ms" in summary:
        excluded = summary["excluded_steps"]
        left_out = (f"; step {', '.join(map(str, excluded))} left out as start-up: {summary['outlier_rule']}"
                    if excluded else "")
        lines.append(f"- mean traced step: {summary['mean_step_ms']:.2f} ms over {summary['kept_steps']} of "
                     f"{len(summary['steps'])} steps (median of all {summary['median_step_ms']:.2f} ms; busy = "
                     f"{summary['source'].upper()} events; idle = step time − busy){left_out}")
    if summary.get("step_ms_host"):
        lines.append(f"- host-clock steps (ms): {', '.join(f'{t:.1f}' for t in summary['step_ms_host'])} "
                     f"(median {summary['host_median_ms']:.1f}, mean without start-up outliers "
                     f"{summary['host_mean_kept_ms']:.1f})")
    if "achieved_tflops" in summary:
        mfu = f"; MFU {summary['mfu_pct']:.1f}% of {H100_NAME} bf16 peak" if "mfu_pct" in summary else ""
        basis = "mean traced step" if "mean_step_ms" in summary else "mean host-clock step"
        lines.append(f"- model FLOPs (6·params·tokens + causal attention) per {basis}: "
                     f"{summary['achieved_tflops']:.3g} TFLOP/s{mfu}")
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
        kept = "" if not summary["excluded_steps"] else " (start-up outliers left out)"
        lines += ["", f"Mean over the kept steps{kept}:", "", "| category | ms per step | share |", "|---|---|---|"]
        for c in ORDER:
            lines.append(f"| {c} | {summary['mean_ms_per_category'][c]:.3f} | {summary['share_pct'][c]:.1f}% |")
        lines.append(f"| **total** | {summary['mean_step_ms']:.3f} | 100.0% |")
        lines += ["", "| step | ms | " + " | ".join(ORDER) + " |", "|---" * (len(ORDER) + 2) + "|"]
        for s in summary["steps"]:
            flag = " (start-up, left out)" if s["excluded"] else ""
            lines.append(f"| {s['step']}{flag} | {s['ms']:.2f} | "
                         + " | ".join(f"{s['categories'][c]:.2f}" for c in ORDER) + " |")
        lines += ["", f"Idle time by the innermost host range open meanwhile (what the loop was doing while the "
                  f"{summary['source'].upper()} waited; mean per kept step):", "", "| host range | idle ms per step |",
                  "|---|---|"]
        lines += [f"| {name} | {ms:.3f} |" for name, ms in summary["idle_by_host_ms"].items()]
        lines += ["", "Top kernels/operators by attributed time (mean per kept step):", "",
                  "| category | name | ms per step |", "|---|---|---|"]
        for t in summary["top"]:
            name = t["name"].replace("|", "/")
            lines.append(f"| {t['category']} | `{name[:110]}` | {t['ms_per_step']:.3f} |")
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
