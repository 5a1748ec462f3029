"""Building blocks for family files: lazy loaders, the standard anchors, seeded random inputs.

Loaders import on call, so a family file imports nothing heavy (nor an op still being written) at import.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tgolf.bench.core import Impl, Loader, tensors_of


def lazy(target: str, **bound: Any) -> Loader:
    """Loader of ``"package.module:function"`` with keyword arguments bound (group_size=..., bits=...)."""
    module, _, attr = target.partition(":")

    def load() -> Callable:
        fn = getattr(importlib.import_module(module), attr)
        return functools.partial(fn, **bound) if bound else fn
    return load


def first_output(loader: Loader) -> Loader:
    """Keep only the first tensor of what the function returns (e.g. ``o`` of ``(o, final_state)``)."""
    def load() -> Callable:
        fn = loader()
        return lambda *args: tensors_of(fn(*args))[0]
    return load


def after_norm(loader: Loader) -> Loader:
    """``linear(rms_norm(x), w)``: a layer fed by the kernel producing its input, as in the GPT's blocks (compiled,
    that is where a layer's activation quantization can fuse)."""
    def load() -> Callable:
        linear = loader()
        return lambda x, w: linear(F.rms_norm(x, (x.shape[-1],)), w)
    return load


def op(target: str, **bound: Any) -> Impl:
    """The candidate: tgolf's public op."""
    return Impl(lazy(target, **bound))


def eager(loader: Loader, **kwargs: Any) -> Impl:
    return Impl(loader, **kwargs)


def compiled(loader: Loader, **kwargs: Any) -> Impl:
    """``torch.compile`` of a function (the reference): the bar a hand-written kernel must clear."""
    return Impl(lambda: torch.compile(loader(), dynamic=False), compiled=True, **kwargs)


def forced_backend(loader: Loader, backend: str) -> Impl:
    """The same op with ``TGOLF_BACKEND`` forced (e.g. the Triton kernel beside the CUDA one). Forward only: a
    custom op's backward runs after the call returns, outside the forced window."""
    def load() -> Callable:
        fn = loader()

        def call(*args):
            previous = os.environ.get("TGOLF_BACKEND")
            os.environ["TGOLF_BACKEND"] = backend
            try:
                return fn(*args)
            finally:
                if previous is None:
                    del os.environ["TGOLF_BACKEND"]
                else:
                    os.environ["TGOLF_BACKEND"] = previous
        return call
    return Impl(load, forward_only=True)


def cublas_linear(weight_arg: int = 1, bias_arg: int | None = None) -> Impl:
    """bf16 ``F.linear`` (cuBLAS) on the same activations and a bf16 copy of the weight (no quantization)."""
    def prepare(inputs: tuple) -> tuple:
        out = list(inputs)
        out[0] = inputs[0].to(torch.bfloat16)
        out[weight_arg] = inputs[weight_arg].to(torch.bfloat16)
        return tuple(out)

    def load() -> Callable:
        if bias_arg is None:
            return lambda *args: F.linear(args[0], args[weight_arg])
        return lambda *args: F.linear(args[0], args[weight_arg], args[bias_arg])
    return Impl(load, prepare=prepare)


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype,
          scale: float = 1.0) -> torch.Tensor:
    """Standard normal × scale, drawn in fp32 on ``device`` (fresh, never zeros), cast to ``dtype``."""
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def randint(high: int, shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen, device=device, dtype=torch.int64)
