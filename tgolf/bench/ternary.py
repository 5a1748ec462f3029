"""Ternary linear layers: the training op (STE, bf16 or int8 activations) and the packed small-M inference GEMM.

Anchors: bf16 ``F.linear`` (cuBLAS, what a ternary layer must beat), the eager reference and its torch.compile.
"""
from __future__ import annotations

import torch

from tgolf.bench.anchors import compiled, cublas_linear, eager, forced_backend, generator, lazy, op, randn
from tgolf.bench.core import BenchCase, Impl

GROUP = 128  # the ternary record's absmean group size

# (M, K, N): tokens per GPU × in_features → out_features (MLP up, MLP down, attention square at width 768).
_LINEAR = {
    "quick": [(48, 96, 80)],
    "contest": [(65536, 512, 1024), (65536, 1024, 512), (65536, 768, 3072)],
    "sweep": [(65536, k, n) for k, n in [(512, 512), (512, 1024), (512, 1536), (1024, 512), (768, 768),
                                         (768, 2304), (768, 3072), (3072, 768)]],
}
# Decode-style GEMV/GEMM where 2-bit weights pay (memory-bound): M small.
_PACKED = {
    "quick": [(3, 128, 80)],
    "contest": [(1, 512, 1024), (16, 768, 3072), (64, 3072, 768)],
    "sweep": [(m, k, n) for m in (1, 4, 16, 64, 256) for k, n in [(512, 1024), (768, 3072), (3072, 768)]],
}


def _linear_inputs(m: int, k: int, n: int):
    def make(device: torch.device, seed: int) -> tuple:
        gen = generator(device, seed)
        return (randn((m, k), gen, device, torch.bfloat16), randn((n, k), gen, device, torch.bfloat16, k ** -0.5))
    return make


def _linear_case(m: int, k: int, n: int, act_bits: int | None) -> BenchCase:
    kwargs = dict(bias=None, group_size=GROUP, act_bits=act_bits)
    reference = lazy("tgolf.ops.ternary.reference:ternary_linear_reference", **kwargs)
    anchors = {"cublas_bf16": cublas_linear(), "eager": eager(reference), "compiled": compiled(reference)}
    if act_bits is not None:  # the int8 path has a CUDA kernel: show the Triton one beside it
        anchors["triton"] = forced_backend(lazy("tgolf.ops.ternary:ternary_linear", **kwargs), "triton")
    return BenchCase(
        op="ternary.ternary_linear", label=f"M{m} K{k} N{n}" + ("" if act_bits is None else f" a{act_bits}"),
        shape=dict(M=m, K=k, N=n), make_inputs=_linear_inputs(m, k, n),
        candidate=op("tgolf.ops.ternary:ternary_linear", **kwargs), reference=reference, anchors=anchors,
        flops=2.0 * m * k * n, bytes=2.0 * (m * k + n * k + m * n), bwd_bytes=2.0 * 3 * (m * k + n * k + m * n),
        grad_argnums=(0, 1), precision="bf16" if act_bits is None else "int8",
        chooser="ternary.linear" if act_bits is None else "ternary.int8_linear",
    )


def _packed_inputs(m: int, k: int, n: int):
    """(x, packed, scales, dense): ``dense`` is the exact dequantized weight, used by the reference and cuBLAS."""
    def make(device: torch.device, seed: int) -> tuple:
        from tgolf.ops.ternary import pack2
        from tgolf.ops.ternary.reference import dequantize_ternary, quantize_ternary

        gen = generator(device, seed)
        x = randn((m, k), gen, device, torch.bfloat16)
        codes, scales = quantize_ternary(randn((n, k), gen, device, torch.float32, k ** -0.5), GROUP)
        return x, pack2(codes), scales, dequantize_ternary(codes, scales, GROUP).float()
    return make


def _packed_reference():
    return lambda x, packed, scales, dense: (x.float() @ dense.T).to(x.dtype)


def _packed_candidate(k: int):
    def load():
        from tgolf.ops.ternary import packed_matmul

        return lambda x, packed, scales, dense: packed_matmul(x, packed, scales, k, group_size=GROUP)
    return load


def _packed_case(m: int, k: int, n: int) -> BenchCase:
    anchors = {"cublas_bf16": cublas_linear(weight_arg=3), "triton": forced_backend(_packed_candidate(k), "triton")}
    return BenchCase(
        op="ternary.packed_matmul", label=f"M{m} K{k} N{n}", shape=dict(M=m, K=k, N=n),
        make_inputs=_packed_inputs(m, k, n), candidate=Impl(_packed_candidate(k), forward_only=True),
        reference=_packed_reference, anchors=anchors, chooser="ternary.packed_mm",
        # 2 bits per weight + fp32 group scales + activations and output in bf16.
        flops=2.0 * m * k * n, bytes=n * k / 4 + 4.0 * n * -(-k // GROUP) + 2.0 * (m * k + m * n),
    )


def cases(shapes: str) -> list[BenchCase]:
    first, *rest = _LINEAR[shapes]
    out = [_linear_case(*first, act_bits=None), _linear_case(*first, act_bits=8)]
    out += [_linear_case(*s, act_bits=None) for s in rest]
    out += [_packed_case(*s) for s in _PACKED[shapes]]
    return out
