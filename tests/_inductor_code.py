"""What inductor generated for a compiled call: the tests that check which kernels a quantization fuses into."""
from __future__ import annotations

from typing import Callable

import torch
from torch._inductor.utils import run_and_get_code


def output_and_grads(fn: Callable, x: torch.Tensor, w: torch.Tensor):
    """``fn(x, w)`` and the gradients of its squared sum with respect to x and w."""
    out = fn(x, w)
    return out, torch.autograd.grad(out.square().sum(), (x, w))


def compiled_run(call: Callable, fn: Callable, *args):
    """``call(torch.compile(fn, fullgraph=True), *args)``: its result, the source of the forward module inductor
    generated, and that module's lines defining its fused kernels (their names list the ops each one fuses)."""
    result, (forward_code, *_) = run_and_get_code(call, torch.compile(fn, fullgraph=True), *args)
    kernels = [line for line in forward_code.splitlines()
               if "_fused_" in line and ("async_compile.cpp" in line or "async_compile.triton(" in line)]
    return result, forward_code, kernels


def called(fn: Callable, *args):
    return fn(*args)


def gpu_layer_after_norm(layer: Callable):
    """``layer(x, w)`` compiled and eager on the GPU for a bf16 [4, 256, 512] activation and a [1536, 512] weight:
    (compiled output, eager output, the forward code, its fused kernels)."""
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1536, 512, device="cuda", requires_grad=True)
    out, code, kernels = compiled_run(called, layer, x, w)
    return out, layer(x, w), code, kernels


def norm_kernel_with(kernels: list[str], *ops: str) -> bool:
    """Whether one of inductor's fused kernels computes the RMSNorm together with ``ops`` (names of aten ops, such
    as "amax"), judged by the kernel's name. The norm shows in it as rsqrt where F.rms_norm decomposes (the CPU
    backend here) and as fused_rms_norm where inductor lowers aten._fused_rms_norm (CUDA: every norm kernel of the
    2026-11-28 H200 training profile, torch 2.11, is named so)."""
    return any(("rsqrt" in k or "fused_rms_norm" in k) and all(op in k for op in ops) for k in kernels)
