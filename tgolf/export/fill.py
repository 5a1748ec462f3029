"""Fill the byte limit: search the matrices' SDClip multiple K so the artifact lands just under it.

With the entropy coder (tgolf.export.rans) a matrix's bytes follow its grid step continuously: the SDClip scale
of a row is K standard deviations over qmax, and each halving of K costs about one more bit a code (half the
step, a quarter of the squared rounding error). So instead of leaving bytes unused, or stepping whole bits down
(``export_fit``), ``export_fill`` picks the smallest K whose artifact fits: it predicts the bytes at any K from the
change in the codes' entropy (round to nearest, no GPTQ: cheap), anchored on the last real write, writes the
artifact at the predicted K, and corrects from the bytes it got, at most MAX_WRITES times. It keeps the largest
artifact that fits, aiming within TOLERANCE of the limit. The embedding keeps its own K and bits: the score is the
most sensitive to them. The records tune K by hand the same way ("tightened quant clips", PR #1934).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from tgolf.export.artifact import ArtifactInfo, BudgetExceeded, write_artifact
from tgolf.export.quantize import (SMALL_NUMEL, embedding_names, int_bits, part_clip_sigmas, quantize_rows,
                                   unwrap_model)
from tgolf.export.rans import order0_bits

TOLERANCE = 0.002  # an artifact within this fraction under the limit is full enough
MAX_WRITES = 4
K_FACTORS = (0.25, 4.0)  # the search range, as factors of the configured K


class BitsAtK:
    """Order-0 entropy, in bits, of the filled matrices' round-to-nearest SDClip codes at any K (computed where
    the weights are: on the GPU after a GPU run)."""

    def __init__(self, model: nn.Module, names: list[str], bits: dict[str, int]):
        state = unwrap_model(model).state_dict()
        self.weights = {name: state[name].detach().float() for name in names}
        self.bits = bits
        self._cache: dict[float, float] = {}

    def __call__(self, k: float) -> float:
        if k not in self._cache:
            self._cache[k] = sum(order0_bits(quantize_rows(w, self.bits[name], None, clip_sigmas=k)[0])
                                 for name, w in self.weights.items())
        return self._cache[k]


def solve_k(bits_at: Callable[[float], float], anchor_k: float, anchor_bytes: int, goal: int, low: float,
            high: float, steps: int = 14) -> float:
    """The K in [low, high] whose predicted bytes (``anchor_bytes`` plus the entropy change from ``anchor_k``)
    are the closest to ``goal`` without passing it: bisection on log K (fewer bytes as K grows)."""
    base = bits_at(anchor_k)

    def predicted(k: float) -> float:
        return anchor_bytes + (bits_at(k) - base) / 8

    if predicted(high) > goal:
        return high
    if predicted(low) <= goal:
        return low
    for _ in range(steps):
        mid = math.sqrt(low * high)
        low, high = (low, mid) if predicted(mid) <= goal else (mid, high)
    return high


def write_filling_artifact(path: str | os.PathLike, model: nn.Module, config: Any, *, scheme: str,
                           schemes: dict[str, str], sigmas: float, embed_sigmas: float, limit: int, code_bytes: int,
                           log: Callable[[str], None], **options: Any) -> tuple[ArtifactInfo, float]:
    """Write the artifact whose matrices' SDClip K fills ``limit`` (model bytes plus ``code_bytes``, an estimate)
    best, starting from ``sigmas``; returns it and its K. ``scheme`` and ``schemes`` (part_schemes) give the bits;
    ``options`` go to write_artifact. BudgetExceeded when even K = 4 × ``sigmas`` does not fit."""
    if sigmas <= 0:
        raise ValueError("export fill: needs the matrices' SDClip multiple (export_clip_sigmas > 0) to start from")
    path = Path(path)
    small_numel = options.get("small_numel", SMALL_NUMEL)
    embed_k = part_clip_sigmas(model, 0.0, embed_sigmas, small_numel)
    filled = sorted(set(part_clip_sigmas(model, sigmas, 0.0, small_numel)) - set(embedding_names(model)))
    bits_at = BitsAtK(model, filled, {name: int_bits(schemes.get(name, scheme), name) for name in filled})
    goal = int(limit * (1 - TOLERANCE / 2))
    low, high = sigmas * K_FACTORS[0], sigmas * K_FACTORS[1]
    best: tuple[int, float, Path, ArtifactInfo] | None = None
    k, written = sigmas, []
    try:
        for attempt in range(MAX_WRITES):
            candidate = path.with_name(f".{path.name}.fill{attempt}")
            written.append(candidate)
            info = write_artifact(candidate, model, config, scheme, overwrite=True, schemes=schemes,
                                  clip_sigmas={**embed_k, **{name: k for name in filled}}, **options)
            total = info.model_bytes + code_bytes
            log(f"export fill: matrices' SDClip K={k:.4g} gives {info.model_bytes:,} B + code ~{code_bytes:,} B = "
                f"{total:,} B ({100 * total / limit:.2f}% of the {limit:,}-byte limit)")
            if total <= limit and (best is None or total > best[0]):
                best = (total, k, candidate, info)
            if limit * (1 - TOLERANCE) <= total <= limit or not filled:  # full, or no matrix whose K to change
                break
            if total > limit:
                low = max(low, k)  # every K below this one gives more bytes
            else:
                high = min(high, k)
            nxt = solve_k(bits_at, k, total, goal, low, high)
            if math.isclose(nxt, k, rel_tol=1e-4) or (total > limit and k >= sigmas * K_FACTORS[1]):
                break
            k = nxt
        if best is None:
            raise BudgetExceeded(f"export fill: {total:,} bytes, over the {limit:,}-byte limit, and no matrix but the "
                                 "embedding has an SDClip K to raise" if not filled else
                                 f"export fill: even SDClip K={k:.4g} for the matrices gives {total:,} bytes, over "
                                 f"the {limit:,}-byte limit")
        total, k, candidate, info = best
        os.replace(candidate, path)
        return dataclasses.replace(info, path=str(path)), k
    finally:
        for leftover in written:
            leftover.unlink(missing_ok=True)


__all__ = ["BitsAtK", "solve_k", "write_filling_artifact"]
