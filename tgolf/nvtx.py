"""NVTX ranges that cost nothing when no profiler listens.

Model and training code mark their phases with ``nvtx_range(name)``; ``tgolf.profile`` turns them on
(``enable_ranges(True)``) so that torch.profiler traces and ``nsys`` timelines show forward, backward,
optimizer, attention, MLP, loss, data and communication by name.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_enabled = False


def enable_ranges(on: bool = True) -> None:
    global _enabled
    _enabled = on


def ranges_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Push an NVTX range (GPU) and a torch.profiler record_function (any device) while enabled."""
    if not _enabled or torch.compiler.is_compiling():
        yield
        return
    use_nvtx = torch.cuda.is_available()
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()
