"""Which families the benchmark knows, and how ``--ops`` selects among their cases."""
from __future__ import annotations

import importlib
from typing import Sequence

from tgolf.bench.core import BenchCase, describe_error

FAMILIES = ("ternary", "quant", "mlp", "loss", "linear_attention", "attention")
SHAPE_SETS = ("quick", "contest", "sweep")


def _wanted(case: BenchCase, names: Sequence[str]) -> bool:
    return not names or case.family in names or case.op in names


def collect(names: Sequence[str], shapes: str) -> tuple[list[BenchCase], list[dict]]:
    """Cases of the selected families/ops, interleaved across ops (so a time budget cuts every op's largest
    shapes, not a whole op); plus one error row per family file that failed to load."""
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes={shapes!r}: expected one of {SHAPE_SETS}")
    unknown = [n for n in names if n.split(".", 1)[0] not in FAMILIES]
    if unknown:
        raise ValueError(f"--ops {','.join(unknown)}: unknown; families are {', '.join(FAMILIES)} "
                         "(or <family>.<op>)")
    per_op: dict[str, list[BenchCase]] = {}
    failed: list[dict] = []
    for family in FAMILIES:
        if names and not any(n.split(".", 1)[0] == family for n in names):
            continue
        try:
            module = importlib.import_module(f"tgolf.bench.{family}")
            for case in module.cases(shapes):
                if _wanted(case, names):
                    per_op.setdefault(case.op, []).append(case)
        except Exception as exc:
            failed.append({"op": family, "family": family, "size": "", "mode": "fwd",
                           "status": f"unavailable: bench file: {describe_error(exc)}", "anchors": {}})
    lists = list(per_op.values())
    interleaved = [ops[i] for i in range(max(map(len, lists), default=0)) for ops in lists if i < len(ops)]
    return interleaved, failed
