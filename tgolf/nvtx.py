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
    # is_compiling() first: inside torch.compile it is a constant True, so the flag is never read there (reading it
    # would make the graph guard on it, and switching ranges on for a profiling window would recompile the model).
    if torch.compiler.is_compiling() or not _enabled:
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
