"""tgolf: Triton and CUDA kernels and a training toolkit for the Parameter Golf contest."""
from __future__ import annotations

__version__ = "0.1.0"


def convert(model, kind: str, skip=(), **kwargs):
    """Swap every ``nn.Linear`` of ``model`` for the drop-in of ``kind`` (see tgolf.nn.convert)."""
    from tgolf.nn.convert import convert as _convert

    return _convert(model, kind, skip=skip, **kwargs)
