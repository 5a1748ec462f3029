"""The fused MLP: up-projection, squared (leaky) ReLU, down-projection.

Anchors: the eager reference (two cuBLAS GEMMs and elementwise kernels) and its torch.compile.
"""
from __future__ import annotations

import torch

from tgolf.bench.anchors import compiled, eager, generator, lazy, op, randn
from tgolf.bench.core import BenchCase

# (M, D, H): tokens per GPU, model width, hidden width.
_SHAPES = {
    "quick": [(40, 64, 96)],
    "contest": [(65536, 512, 1024), (65536, 512, 1536), (65536, 768, 3072)],
    "sweep": [(65536, d, m * d) for d in (512, 640, 768) for m in (2, 3, 4)],
}


def _inputs(m: int, d: int, h: int):
    def make(device: torch.device, seed: int) -> tuple:
        gen = generator(device, seed)
        return (randn((m, d), gen, device, torch.bfloat16), randn((h, d), gen, device, torch.bfloat16, d ** -0.5),
                randn((d, h), gen, device, torch.bfloat16, h ** -0.5))
    return make


def _case(m: int, d: int, h: int, activation: str) -> BenchCase:
    kwargs = dict(activation=activation, negative_slope=0.5)
    reference = lazy("tgolf.ops.mlp.reference:mlp_reference", **kwargs)
    io = 2.0 * (m * d + h * d + d * h + m * d)  # x, both weights, output (the hidden stays on chip when fused)
    return BenchCase(
        op="mlp.fused_mlp", label=f"M{m} D{d} H{h} {activation}", shape=dict(M=m, D=d, H=h),
        make_inputs=_inputs(m, d, h), candidate=op("tgolf.ops.mlp:fused_mlp", **kwargs), reference=reference,
        anchors={"eager": eager(reference), "compiled": compiled(reference)},
        flops=4.0 * m * d * h, bytes=io, grad_argnums=(0, 1, 2),
    )


def cases(shapes: str) -> list[BenchCase]:
    first, *rest = _SHAPES[shapes]
    return ([_case(*first, activation="relu2"), _case(*first, activation="leaky_relu2")]
            + [_case(*s, activation="relu2") for s in rest])
