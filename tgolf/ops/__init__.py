"""Public ops, one sub-package per family (reference.py beside the op's dispatch and autograd).

``tgolf.ops.<op>`` imports its family on first use, so ``import tgolf.ops`` loads no kernel.
"""
from __future__ import annotations

import importlib
from typing import Any

_OPS = {
    "ternary_linear": "tgolf.ops.ternary",
    "packed_matmul": "tgolf.ops.ternary",
    "qat_linear": "tgolf.ops.quant",
    "fp8_linear": "tgolf.ops.quant",
    "fused_mlp": "tgolf.ops.mlp",
    "softcap_cross_entropy": "tgolf.ops.loss",
    "linear_attention": "tgolf.ops.linear_attention",
}


def __getattr__(name: str) -> Any:
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module 'tgolf.ops' has no attribute {name!r}")


__all__ = list(_OPS)
