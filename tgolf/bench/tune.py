"""``python -m tgolf.bench.tune``: search the tiles of tgolf's Triton GEMMs on the GPU at hand.

The GEMM launchers take a ``config`` (block sizes, warps, pipeline stages) whose defaults were chosen on a CPU: the
sm_90 compile test proves them within H100's resources, not fast. On the first H100 run they ran at 61–454 TFLOP/s
forward where bf16 cuBLAS ran at 542–706 (profiles/2026-11-27-NVIDIA-H100-80GB-HBM3). This tool times each kernel
at the contest shapes with every candidate tile, after checking that tile's output against the default tile's
(exact for the int8 GEMM, 1e-2 relative for bf16), beside bf16 cuBLAS, and writes ``tune.json`` and ``tune.md``:
per kernel and shape the default's time, the best tile and its time. Winners are copied into the kernels' config
functions by hand, with the run committed under ``profiles/``.

    python -m tgolf.bench.tune --kernels int8_mm,ternary_mm,qat_matmul --out tune_out
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from tgolf.backend import triton_interpret
from tgolf.bench.core import describe_error, rel_err
from tgolf.bench.timing import TimingPlan, time_calls
from tgolf.profile.env import collect_env

# (K, N) of the contest's linear layers at width 512–768 (attention, MLP up and down), M = 65,536 tokens per GPU.
CONTEST_KN = ((512, 1536), (1536, 512), (512, 512), (768, 3072))
TOKENS = 65536

# Hopper-shaped tiles (wgmma wants 64-row multiples per warpgroup; 8 warps for 128×256): the search space.
_TILES = [(128, 128, 8, 3), (128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4),
          (64, 256, 8, 3), (128, 128, 8, 4)]
_QUICK_TILES = [(16, 32, 4, 1), (32, 16, 4, 1)]  # CPU (interpreter) runs: the plumbing only


@dataclass(frozen=True)
class Tunable:
    """A GEMM launcher with a ``config``: ``inputs(m, k, n, device)`` → tuple; ``run(inputs, config)`` → output."""

    name: str
    inputs: Callable[[int, int, int, torch.device], tuple]
    run: Callable[[tuple, dict | None], torch.Tensor]
    configs: Callable[[list[tuple[int, int, int, int]]], list[dict]]
    exact: bool = False  # integer accumulation: every tile must agree bit for bit


def _ternary_inputs(m: int, k: int, n: int, device: torch.device) -> tuple:
    gen = torch.Generator(device=device).manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    codes = torch.randint(-1, 2, (n, k), generator=gen, device=device, dtype=torch.int8)
    scales = torch.rand(n, 1, generator=gen, device=device) + 0.5
    return x, codes, scales


def _int8_inputs(m: int, k: int, n: int, device: torch.device) -> tuple:
    x, codes, scales = _ternary_inputs(m, k, n, device)
    from tgolf.ops.ternary.reference import quantize_activations_int8

    xq, xs = quantize_activations_int8(x)
    return xq, xs, codes, scales


def _interpret(device: torch.device) -> bool:
    return device.type != "cuda"


def _int8_run(inputs: tuple, config: dict | None) -> torch.Tensor:
    from tgolf.kernels import ternary

    xq, xs, codes, scales = inputs
    return ternary.int8_mm(xq, xs, codes, scales, codes.shape[1], torch.bfloat16,
                           interpret=_interpret(xq.device), config=config)


def _ternary_run(inputs: tuple, config: dict | None) -> torch.Tensor:
    from tgolf.kernels import ternary

    x, codes, scales = inputs
    return ternary.ternary_mm(x, codes, scales, codes.shape[1], ternary.MODE_FORWARD, codes.shape[1],
                              interpret=_interpret(x.device), config=config)


def _qat_run(inputs: tuple, config: dict | None) -> torch.Tensor:
    from tgolf.kernels import quant

    x, codes, scales = inputs
    return quant.qat_matmul(x, codes, scales, codes.shape[1], config=config)


def _tiles(m_key: str, n_key: str, k_key: str | None = None, k_values: tuple[int, ...] = ()):
    """The launcher's config dicts for (BLOCK_M, BLOCK_N, warps, stages) tiles, × ``k_values`` of ``k_key``."""
    def configs(tiles: list[tuple[int, int, int, int]]) -> list[dict]:
        base = [{m_key: bm, n_key: bn, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
                for bm, bn, warps, stages in tiles]
        return [{**cfg, k_key: bk} for cfg in base for bk in k_values] if k_key else base
    return configs


TUNABLES = {
    # BLOCK_K of the int8 GEMM follows the scale groups (int8_block_k), so only M and N tiles are searched.
    "int8_mm": Tunable("int8_mm", _int8_inputs, _int8_run, _tiles("BLOCK_M", "BLOCK_N"), exact=True),
    "ternary_mm": Tunable("ternary_mm", _ternary_inputs, _ternary_run,
                          _tiles("BLOCK_M", "BLOCK_C", "BLOCK_R", (64, 128))),
    "qat_matmul": Tunable("qat_matmul", _ternary_inputs, _qat_run, _tiles("BLOCK_M", "BLOCK_N", "BLOCK_K", (64, 128))),
}


def _timed(fn: Callable[[], object], device: torch.device, plan: TimingPlan) -> float:
    return time_calls([fn], device, plan).median_ms


def tune_shape(tunable: Tunable, m: int, k: int, n: int, device: torch.device, tiles: list, plan: TimingPlan,
               deadline: float) -> dict:
    """One kernel at one shape: the default tile, every candidate tile (checked first), bf16 cuBLAS."""
    inputs = tunable.inputs(m, k, n, device)
    row: dict = {"kernel": tunable.name, "M": m, "K": k, "N": n, "candidates": []}
    try:
        want = tunable.run(inputs, None)
        row["default_ms"] = _timed(lambda: tunable.run(inputs, None), device, plan)
    except Exception as exc:  # the default itself failing is the finding
        row["status"] = f"error: default tile: {describe_error(exc)}"
        return row
    x_bf16, w_bf16 = (torch.randn(rows, k, device=device).to(torch.bfloat16) for rows in (m, n))
    row["cublas_bf16_ms"] = _timed(lambda: F.linear(x_bf16, w_bf16), device, plan)
    for cfg in tunable.configs(tiles):
        entry: dict = {"config": cfg}
        row["candidates"].append(entry)
        if time.monotonic() > deadline:
            entry["status"] = "skipped: time budget"
            continue
        try:
            got = tunable.run(inputs, cfg)
            err = 0.0 if torch.equal(got, want) else (float("inf") if tunable.exact else rel_err(got, want))
            if not err <= 1e-2:
                entry["status"] = f"incorrect: rel err {err:.3g}"
                continue
            entry.update(status="ok", ms=_timed(lambda: tunable.run(inputs, cfg), device, plan))
        except Exception as exc:  # e.g. OutOfResources: the tile does not fit this GPU
            entry["status"] = f"error: {describe_error(exc)}"
    timed = [c for c in row["candidates"] if c.get("status") == "ok"]
    row["status"] = "ok"
    if timed:
        best = min(timed, key=lambda c: c["ms"])
        row.update(best_config=best["config"], best_ms=best["ms"], speedup_over_default=row["default_ms"] / best["ms"])
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# tgolf tile search — {meta.get('device_name', '?')}", "",
             f"{meta.get('date_utc', '')} · torch {meta.get('torch')} · triton {meta.get('triton')} · "
             f"commit {meta.get('git_commit')}", "", f"`{meta.get('command', '')}`", "",
             "Median ms per call (on CUDA the L2 is flushed between calls). Each tile was checked against the default "
             "tile's output before timing.", "",
             "| kernel | M | K | N | default ms | best ms | best / default | cuBLAS bf16 ms | best tile | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = r.get("best_config")
        lines.append(f"| {r['kernel']} | {r['M']} | {r['K']} | {r['N']} | {r.get('default_ms', 0):.3f} | "
                     f"{r.get('best_ms', 0):.3f} | {r.get('speedup_over_default', 0):.2f}× | "
                     f"{r.get('cublas_bf16_ms', 0):.3f} | {json.dumps(best) if best else ''} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tgolf.bench.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default=",".join(TUNABLES), help=f"comma-separated: {', '.join(TUNABLES)}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="tune_out")
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds; later tiles are skipped (0 = none)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.kernels.split(",") if n.strip()]
    unknown = [n for n in names if n not in TUNABLES]
    if unknown:
        print(f"tgolf.bench.tune: --kernels {','.join(unknown)}: unknown; choose from {', '.join(TUNABLES)}",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tgolf.bench.tune: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    # On the CPU (the interpreter) only the plumbing is exercised: tiny shapes and tiles.
    gpu = device.type == "cuda"
    if not gpu and not triton_interpret():
        print("tgolf.bench.tune: --device cpu runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    shapes = [(TOKENS, k, n) for k, n in CONTEST_KN] if gpu else [(40, 48, 36)]
    tiles = _TILES if gpu else _QUICK_TILES
    plan = TimingPlan.for_device(device, quick=not gpu)
    deadline = time.monotonic() + args.time_budget if args.time_budget > 0 else float("inf")
    command = " ".join(["python -m tgolf.bench.tune", *(sys.argv[1:] if argv is None else argv)])
    meta = {**collect_env(command), "device": device.type}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        for m, k, n in shapes:
            print(f"{name} M{m} K{k} N{n}", file=sys.stderr, flush=True)
            rows.append(tune_shape(TUNABLES[name], m, k, n, device, tiles, plan, deadline))
            (out / "tune.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    table = markdown(meta, rows)
    (out / "tune.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
