"""Fit the artifact under the byte limit by giving the matrices fewer bits, one step at a time.

A run whose artifact comes out a little over 16,000,000 bytes ends with nothing to submit after its 600 s on
8×H100. With ``export_fit`` the exporter tries the configured schemes first, then the MLP matrices one bit
fewer, then the other matrices one bit fewer as well, and so on down to int4, and keeps the first artifact that
fits. The embedding keeps its bits: the score is the most sensitive to them. The records fit by hand the same
way (int5 MLP beside int6 attention).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch.nn as nn

from tgolf.export.artifact import ArtifactInfo, BudgetExceeded, write_artifact
from tgolf.export.quantize import (SMALL_NUMEL, embedding_names, int_bits, mlp_matrix_names, part_schemes,
                                   rounded_matrix_names)

MIN_BITS = 4


def bits_ladder(scheme: str, mlp_scheme: str = "") -> list[tuple[str, str]]:
    """(matrices' scheme, MLP matrices' scheme) pairs to try, in order: the given ones, then one bit off the MLP
    (while it has at least the others' bits), else off the others, down to int4 for both."""
    other, mlp = int_bits(scheme, "scheme"), int_bits(mlp_scheme or scheme, "mlp_scheme")
    ladder = [(other, mlp)]
    while other > MIN_BITS or mlp > MIN_BITS:
        if mlp > MIN_BITS and (mlp >= other or other == MIN_BITS):
            mlp -= 1
        else:
            other -= 1
        ladder.append((other, mlp))
    return [(f"int{a}", f"int{b}") for a, b in ladder]


def write_fitting_artifact(path: str | os.PathLike, model: nn.Module, config: Any, *, scheme: str, mlp_scheme: str,
                           embed_scheme: str, limit: int, code_bytes: int, log: Callable[[str], None],
                           **options: Any) -> tuple[ArtifactInfo, str, str]:
    """Write the first artifact of ``bits_ladder`` whose model bytes plus ``code_bytes`` (an estimate: the run
    counts its code once everything is imported) fit in ``limit``; returns it with its two schemes. The
    embedding stays at ``embed_scheme`` ("" = ``scheme``). ``options`` go to ``write_artifact``. A step that
    changes no tensor (QAT and ternary layers export the codes they trained with) is skipped. BudgetExceeded when
    even int4 matrices do not fit, or when no matrix has bits to take away."""
    small_numel = options.get("small_numel", SMALL_NUMEL)
    rounded = set(rounded_matrix_names(model, small_numel))
    mlp_names = set(mlp_matrix_names(model))
    steps_mlp, steps_other = bool(rounded & mlp_names), bool(rounded - mlp_names - set(embedding_names(model)))
    tried: set[tuple[str, str]] = set()
    total = 0
    for other, mlp in bits_ladder(scheme, mlp_scheme):
        # a part with no rounded matrix keeps its configured scheme: stepping it would change no byte
        other, mlp = other if steps_other else scheme, mlp if steps_mlp else mlp_scheme or scheme
        if (other, mlp) in tried:
            continue
        tried.add((other, mlp))
        info = write_artifact(path, model, config, other, overwrite=True,
                              schemes=part_schemes(model, embed_scheme or scheme, mlp), **options)
        total = info.model_bytes + code_bytes
        if total <= limit:
            return info, other, mlp
        log(f"export fit: {other} matrices with {mlp} MLP give {info.model_bytes:,} B + code ~{code_bytes:,} B = "
            f"{total:,} B, over the {limit:,}-byte limit: trying fewer bits")
    if not (steps_mlp or steps_other):
        raise BudgetExceeded(f"export fit: {total:,} bytes, over the {limit:,}-byte limit, and no matrix but the "
                             "embedding has bits to take away: QAT and ternary layers export the codes they trained "
                             f"with, and matrices of at most {small_numel:,} elements stay float")
    raise BudgetExceeded(f"export fit: even int4 matrices give {total:,} bytes, over the {limit:,}-byte limit")


__all__ = ["bits_ladder", "write_fitting_artifact"]
