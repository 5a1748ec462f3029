"""PNG charts of speed against size: one figure per family, forward and forward+backward side by side.

The y axis is the achieved rate with the case's own FLOP count (for anchors too, so the curves compare
times on one scale), or the time where a case declares no FLOP count.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows: list[dict]) -> dict[tuple[str, str], dict[str, list[tuple[str, float]]]]:
    """(op, mode) → implementation → [(size, value)], value in TFLOP/s (or ms without a FLOP count)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status") != "ok":
            continue
        flops = r.get("flops")

        def value(ms: float) -> float:
            return flops / (ms * 1e-3) / 1e12 if flops else ms
        key = (r["op"], r["mode"])
        out[key]["tgolf"].append((r["size"], value(r["time"]["median_ms"])))
        for name, entry in r.get("anchors", {}).items():
            if entry.get("status") == "ok":
                out[key][name].append((r["size"], value(entry["median_ms"])))
    return out


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    series = _series(rows)
    written = []
    for family in sorted({op.split(".", 1)[0] for op, _ in series}):
        keys = sorted(k for k in series if k[0].split(".", 1)[0] == family)
        fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            sizes: list[str] = []
            for impl in series[key].values():
                sizes += [s for s, _ in impl if s not in sizes]
            for name, points in series[key].items():
                xs = [sizes.index(s) for s, _ in points]
                ax.plot(xs, [v for _, v in points], marker="o", linewidth=2.5 if name == "tgolf" else 1.2,
                        label=name)
            ax.set_xticks(range(len(sizes)), sizes, rotation=30, ha="right", fontsize=7)
            flops_known = any(r.get("flops") for r in rows if (r["op"], r.get("mode")) == key)
            ax.set_ylabel("TFLOP/s (case FLOP count)" if flops_known else "ms")
            ax.set_title(f"{key[0]} — {key[1]}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"bench_{family}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
