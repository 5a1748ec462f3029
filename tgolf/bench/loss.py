"""The softcapped cross-entropy with the (tied) lm head fused in: logits never reach device memory.

Anchors: the eager reference (cuBLAS GEMM, fp32 logits, tanh, cross-entropy), its torch.compile, the op
with its Triton and its CUDA chunk kernel forced (on a GPU; the CUDA one when the extension is built), and the op
with logits chunks of 8 and 16 MB (``chunk_8mb``, ``chunk_16mb``) where those are smaller than its default.

Why the chunk sizes: each chunk's logits are written by one GEMM, read and overwritten by the chunk kernel and
read by two more GEMMs. A chunk that stays in the H100's 50 MB L2 spares those passes most of their HBM traffic,
but every chunk adds a read and a write of the fp32 grad_weight accumulator [V, D]; the default
(``chunk_rows_for``: up to 32M logits, 64 MB in bf16, and at least 4 chunks: 32 MB at N = 65,536, V = 1024) is
a guess that these rows time against L2-sized ones.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from tgolf.bench.anchors import compiled, eager, forced_backend, generator, lazy, op, randint, randn
from tgolf.bench.core import BenchCase, Impl

# (N, D, V): tokens per GPU, model width, vocabulary.
_SHAPES = {
    "quick": [(72, 64, 200)],
    "contest": [(65536, 512, 1024), (65536, 512, 8192), (65536, 768, 8192)],
    "sweep": [(65536, d, v) for d in (512, 768) for v in (1024, 2048, 4096, 8192)],
}


def _inputs(n: int, d: int, v: int):
    def make(device: torch.device, seed: int) -> tuple:
        gen = generator(device, seed)
        return (randn((n, d), gen, device, torch.bfloat16), randn((v, d), gen, device, torch.bfloat16, 0.5),
                randint(v, (n,), gen, device))
    return make


_ROW_MULTIPLE = 128  # chunk rows in multiples of this, as the op's own chunk_rows_for


def _chunk_variants(n: int, v: int, **kwargs) -> dict[str, Impl]:
    """The op with logits chunks of 8 and 16 MB (bf16), where that is fewer rows than its default chunk."""
    from tgolf.ops.loss import chunk_rows_for

    variants = {}
    for mb in (8, 16):
        rows = max(_ROW_MULTIPLE, (mb << 20) // (2 * v) // _ROW_MULTIPLE * _ROW_MULTIPLE)
        if rows < chunk_rows_for(n, v):
            variants[f"chunk_{mb}mb"] = op("tgolf.ops.loss:softcap_cross_entropy", chunk_rows=rows, **kwargs)
    return variants


def _case(n: int, d: int, v: int) -> BenchCase:
    kwargs = dict(softcap=30.0, reduction="mean")
    reference = lazy("tgolf.ops.loss.reference:softcap_cross_entropy_reference", **kwargs)
    return BenchCase(
        op="loss.softcap_cross_entropy", label=f"N{n} D{d} V{v}", shape=dict(N=n, D=d, V=v),
        make_inputs=_inputs(n, d, v), candidate=op("tgolf.ops.loss:softcap_cross_entropy", **kwargs),
        reference=reference,
        anchors={"eager": eager(reference), "compiled": compiled(reference),
                 # the chunk kernel has a CUDA and a Triton version (the op picks one by vocabulary): both, forced
                 **{backend: replace(forced_backend(lazy("tgolf.ops.loss:softcap_cross_entropy", **kwargs), backend),
                                     cuda_only=backend == "cuda") for backend in ("triton", "cuda")},
                 **_chunk_variants(n, v, **kwargs)},
        flops=2.0 * n * d * v, bytes=2.0 * (n * d + v * d) + 8.0 * n,
        bwd_bytes=2.0 * 2 * (n * d + v * d) + 8.0 * n, grad_argnums=(0, 1),
    )


def cases(shapes: str) -> list[BenchCase]:
    return [_case(*s) for s in _SHAPES[shapes]]
