"""Ternary linear layers: the training op (STE, bf16 or int8 activations), the int8 inference op and the packed
small-M inference GEMM.

Where tgolf has a CUDA kernel (int8 GEMMs with one scale per row, the packed GEMV) the candidate is the op as
shipped and the other backend runs beside it (forward only): the packed GEMV picks its CUDA kernel and times its
Triton twin (``TGOLF_BACKEND=triton``); the int8 ops pick Triton (their CUDA kernels are opt-in, measured slower)
and time the CUDA kernel (``TGOLF_BACKEND=cuda``).
Anchors: bf16 ``F.linear`` (cuBLAS, what a ternary layer must beat) and, for training, plain-PyTorch fake
quantization (what the contest's ternary record ran: absmean, round, straight-through ``detach``) eagerly and
under ``torch.compile``. tgolf's own reference computes its scales in float64 to be bit-exact, so it checks
correctness but would be an unfairly slow speed anchor.

Issue targets (tgolf issues 4 and 7), all in ``--shapes contest``:

* training op, M = 65,536, (K, N) in (512, 1536), (1536, 512), (512, 512), (768, 3072), forward+backward against
  bf16 ``nn.Linear``, the eager fake-quant and its ``torch.compile``, per row and per group of 128 (the record's);
  ``act_bits=8`` (per row: the int8 CUDA GEMM) forward against bf16. The candidate (default "dense" GEMMs)
  quantizes on every call; ``cached`` is TernaryLinear's call between optimizer steps (quantization cached), and
  ``codes_gemm`` the Triton GEMMs that read the int8 codes;
* int8 inference forward, one scale per row, M = 65,536, (K, N) in (512, 1536), (1536, 512): CUDA kernel against its
  Triton twin and bf16 cuBLAS;
* packed GEMV / small-M GEMM, M in 1, 4, 16, K = N = 4096: CUDA kernel against its Triton twin and bf16 cuBLAS;
* ``act_bits=8`` as a compiled model runs it, after the RMSNorm producing its input (inductor fuses the int8
  quantization into the norm's kernel): ``torch.compile(ternary_linear(rms_norm(x), w))`` beside the same block
  in bf16 (``compiled_bf16``), M = 65,536, (K, N) = (512, 1536).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tgolf.bench.anchors import (after_norm, compiled, cublas_linear, eager, forced_backend, generator, lazy,
                                 op, randn)
from tgolf.bench.core import BenchCase, Impl

GROUP = 128  # the ternary record's absmean group size
ROW = None  # one scale per output row: TernaryLinear's default, and the only scales the int8 CUDA kernels take
TOKENS = 65536  # tokens per GPU per step in the contest

_CONTEST_KN = [(512, 1536), (1536, 512), (512, 512), (768, 3072)]  # MLP up / down, attention, MLP 4× at width 768
_INT8_KN = [(512, 1536), (1536, 512)]
_SWEEP_KN = [(512, 512), (512, 1024), (512, 1536), (1536, 512), (1024, 512), (768, 768), (768, 2304), (768, 3072),
             (3072, 768)]

# Training op: (M, K, N, group_size, act_bits).
_LINEAR = {
    "quick": [(48, 96, 80, 32, None), (48, 96, 80, 32, 8), (48, 96, 80, ROW, 8)],
    # Row scales at every shape first (the issue targets), then int8 activations, then groups: a time budget
    # cuts the variants, not the shapes.
    "contest": [(TOKENS, k, n, g, a) for g, a in ((ROW, None), (ROW, 8), (GROUP, None)) for k, n in _CONTEST_KN],
    "sweep": [(TOKENS, k, n, g, a) for k, n in _SWEEP_KN for g in (ROW, GROUP) for a in (None, 8)],
}
# int8 inference (activation quantization fused), one scale per row: (M, K, N).
_INT8 = {
    "quick": [(40, 96, 72)],
    "contest": [(TOKENS, k, n) for k, n in _INT8_KN],
    "sweep": [(m, k, n) for m in (4096, TOKENS) for k, n in _SWEEP_KN],
}
# Decode-style GEMV / small-M GEMM where 2-bit weights pay (memory-bound): (M, K, N, group_size).
_PACKED = {
    "quick": [(3, 128, 80, 64)],
    "contest": [(m, 4096, 4096, ROW) for m in (1, 4, 16)] + [(1, 4096, 4096, GROUP), (16, 768, 3072, GROUP)],
    "sweep": [(m, k, n, g) for m in (1, 4, 16, 64) for k, n in [(4096, 4096), (768, 3072), (3072, 768)]
              for g in (ROW, GROUP)],
}


def _group_label(group_size: int | None) -> str:
    return "row" if group_size is None else f"g{group_size}"


# ------------------------------------------------------------------------------------------------- training op

def fake_quant_linear(x: torch.Tensor, w: torch.Tensor, group_size: int | None = None,
                      act_bits: int | None = None) -> torch.Tensor:
    """Plain-PyTorch ternary QAT as the contest record ran it (fp32 absmean, round, clamp, ``detach`` STE, then
    ``F.linear`` in x's dtype); per-token absmax int8 activations for ``act_bits=8``. The speed anchor only."""
    n, k = w.shape
    g = k if group_size is None else group_size
    if k % g:
        raise ValueError(f"fake_quant_linear: in_features={k} must be a multiple of group_size={g}")
    wg = w.float().reshape(n, k // g, g)
    scale = wg.abs().mean(dim=-1, keepdim=True).clamp_min(1e-5)
    wq = ((wg / scale).round().clamp(-1, 1) * scale).reshape(n, k).to(w.dtype)
    w = w + (wq - w).detach()
    if act_bits == 8:
        amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
        xq = ((x.float() * (127 / amax)).round().clamp(-127, 127) * (amax / 127)).to(x.dtype)
        x = x + (xq - x).detach()
    return F.linear(x, w)


def _fake_quant(group_size: int | None, act_bits: int | None):
    return lambda: lambda x, w: fake_quant_linear(x, w, group_size, act_bits)


def _linear_inputs(m: int, k: int, n: int):
    def make(device: torch.device, seed: int) -> tuple:
        gen = generator(device, seed)
        return (randn((m, k), gen, device, torch.bfloat16), randn((n, k), gen, device, torch.bfloat16, k ** -0.5))
    return make


def _cached_dense(group_size: int | None) -> Impl:
    """TernaryLinear's training call between optimizer steps: codes, scales and the dense copy already cached
    (made untimed in ``prepare``), so only the cuBLAS GEMMs remain; the candidate quantizes on every call."""
    def prepare(inputs: tuple) -> tuple:
        from tgolf.ops.ternary import dense_weight, ternary_quantize

        x, w = inputs
        codes, scales, _ = ternary_quantize(w, group_size)
        return x, w, codes, scales, dense_weight(codes, scales, group_size, x.dtype)

    def load() -> Callable:
        from tgolf.ops.ternary import ternary_linear_quantized

        return lambda x, w, codes, scales, dense: ternary_linear_quantized(x, w, codes, scales, None, group_size,
                                                                           None, "dense", dense)
    return Impl(load, prepare=prepare)


def _linear_case(m: int, k: int, n: int, group_size: int | None, act_bits: int | None) -> BenchCase:
    kwargs = dict(bias=None, group_size=group_size, act_bits=act_bits)
    speed_anchor = _fake_quant(group_size, act_bits)
    anchors = {"cublas_bf16": cublas_linear(), "eager": eager(speed_anchor), "compiled": compiled(speed_anchor)}
    if act_bits is None:  # the default "dense" GEMMs, beside Triton's GEMMs on the codes and the cached call
        anchors["codes_gemm"] = op("tgolf.ops.ternary:ternary_linear", gemm="codes", **kwargs)
        anchors["cached"] = _cached_dense(group_size)
    cuda_int8 = act_bits == 8 and group_size is None  # the forward's GEMM is ternary_int8_mm_cuda where built
    if cuda_int8:
        # The CUDA int8 GEMM is opt-in (measured slower than Triton, which the candidate runs): timed beside it.
        anchors["cuda"] = forced_backend(lazy("tgolf.ops.ternary:ternary_linear", **kwargs), "cuda")
    return BenchCase(
        op="ternary.ternary_linear",
        label=f"M{m} K{k} N{n} {_group_label(group_size)}" + ("" if act_bits is None else f" a{act_bits}"),
        shape=dict(M=m, K=k, N=n), make_inputs=_linear_inputs(m, k, n),
        candidate=op("tgolf.ops.ternary:ternary_linear", **kwargs),
        reference=lazy("tgolf.ops.ternary.reference:ternary_linear_reference", **kwargs), anchors=anchors,
        flops=2.0 * m * k * n, bytes=2.0 * (m * k + n * k + m * n), bwd_bytes=2.0 * 3 * (m * k + n * k + m * n),
        grad_argnums=(0, 1), precision="bf16" if act_bits is None else "int8",
        chooser="ternary.int8_mm" if cuda_int8 else "ternary.linear",
    )


# ------------------------------------------------------------------------------- inference ops (no autograd)

def _quantized_inputs(m: int, k: int, n: int, group_size: int | None, packed: bool):
    """(x, weight, scales, dense): ``weight`` is the 2-bit packed codes or the int8 codes; ``dense`` the exact
    dequantized weight in fp32, used by the reference and (as bf16) by cuBLAS."""
    def make(device: torch.device, seed: int) -> tuple:
        from tgolf.ops.ternary import pack2
        from tgolf.ops.ternary.reference import dequantize_ternary, quantize_ternary

        gen = generator(device, seed)
        x = randn((m, k), gen, device, torch.bfloat16)
        codes, scales = quantize_ternary(randn((n, k), gen, device, torch.float32, k ** -0.5), group_size)
        dense = dequantize_ternary(codes, scales, group_size).float()
        return x, pack2(codes) if packed else codes, scales, dense
    return make


def _packed_reference():
    return lambda x, packed, scales, dense: (x.float() @ dense.T).to(x.dtype)


def _packed_candidate(k: int, group_size: int | None):
    def load():
        from tgolf.ops.ternary import packed_matmul

        return lambda x, packed, scales, dense: packed_matmul(x, packed, scales, k, group_size=group_size)
    return load


def _packed_case(m: int, k: int, n: int, group_size: int | None) -> BenchCase:
    anchors = {"cublas_bf16": cublas_linear(weight_arg=3),
               "triton": forced_backend(_packed_candidate(k, group_size), "triton")}
    groups = 1 if group_size is None else -(-k // group_size)
    return BenchCase(
        op="ternary.packed_matmul", label=f"M{m} K{k} N{n} {_group_label(group_size)}", shape=dict(M=m, K=k, N=n),
        make_inputs=_quantized_inputs(m, k, n, group_size, packed=True),
        candidate=Impl(_packed_candidate(k, group_size), forward_only=True),
        reference=_packed_reference, anchors=anchors, chooser="ternary.packed_mm",
        # 2 bits per weight + fp32 scales + activations and output in bf16.
        flops=2.0 * m * k * n, bytes=n * k / 4 + 4.0 * n * groups + 2.0 * (m * k + m * n),
    )


def _int8_reference():
    def reference(x, codes, scales, dense):
        from tgolf.ops.ternary.reference import quantize_activations_int8

        xq, xs = quantize_activations_int8(x)
        return ((xq.float() * xs[:, None]) @ dense.T).to(x.dtype)
    return reference


def _int8_candidate():
    def load():
        from tgolf.ops.ternary import int8_linear

        return lambda x, codes, scales, dense: int8_linear(x, codes, scales)
    return load


def _int8_case(m: int, k: int, n: int) -> BenchCase:
    anchors = {"cublas_bf16": cublas_linear(weight_arg=3), "cuda": forced_backend(_int8_candidate(), "cuda")}
    return BenchCase(
        op="ternary.int8_linear", label=f"M{m} K{k} N{n} row", shape=dict(M=m, K=k, N=n),
        make_inputs=_quantized_inputs(m, k, n, ROW, packed=False),
        candidate=Impl(_int8_candidate(), forward_only=True),
        reference=_int8_reference, anchors=anchors, chooser="ternary.int8_linear", precision="int8",
        # bf16 activations in, int8 codes, fp32 row scales, bf16 output.
        flops=2.0 * m * k * n, bytes=2.0 * m * k + n * k + 4.0 * n + 2.0 * m * n,
    )


def _a8_after_norm_case(m: int, k: int, n: int) -> BenchCase:
    def layer(target: str):
        return after_norm(lazy(target, bias=None, group_size=ROW, act_bits=8))

    return BenchCase(
        op="ternary.ternary_linear", label=f"M{m} K{k} N{n} row a8 after rms_norm, compiled",
        shape=dict(M=m, K=k, N=n), make_inputs=_linear_inputs(m, k, n),
        candidate=compiled(layer("tgolf.ops.ternary:ternary_linear")),
        reference=layer("tgolf.ops.ternary.reference:ternary_linear_reference"),
        anchors={"compiled_bf16": compiled(after_norm(lambda: F.linear))},
        flops=2.0 * m * k * n, bytes=2.0 * (m * k + n * k + m * n), bwd_bytes=2.0 * 3 * (m * k + n * k + m * n),
        grad_argnums=(0, 1), precision="int8", chooser="ternary.int8_mm",
    )


def cases(shapes: str) -> list[BenchCase]:
    a8_shape = _INT8[shapes][0]  # contest: M = 65,536, (K, N) = (512, 1536)
    return ([_linear_case(*s) for s in _LINEAR[shapes]] + [_int8_case(*s) for s in _INT8[shapes]]
            + [_packed_case(*s) for s in _PACKED[shapes]] + [_a8_after_norm_case(*a8_shape)])
