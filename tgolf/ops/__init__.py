"""Public ops, one sub-package per family (reference.py beside the op's dispatch and autograd).

``tgolf.ops.<op>`` imports its family on first use, so ``import tgolf.ops`` loads no kernel.
"""
from __future__ import annotations

from tgolf._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "tgolf.ops.ternary": ("ternary_linear", "packed_matmul"),
    "tgolf.ops.quant": ("qat_linear", "fp8_linear"),
    "tgolf.ops.mlp": ("fused_mlp",),
    "tgolf.ops.loss": ("softcap_cross_entropy",),
    "tgolf.ops.linear_attention": ("linear_attention",),
})
