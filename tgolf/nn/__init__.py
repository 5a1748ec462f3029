"""Drop-in modules, chosen by name so that configuration swaps them (``Config.linear``, ``.mlp``, ...).

The registry maps names to ``"module:attribute"`` strings and imports on first use, so each op family
owns its own file and nothing here imports a kernel before it is needed.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch.nn as nn

from tgolf.config import parse_linear_kind

_MODULES = {
    # name: "tgolf.nn.<family>:Class"
    "TernaryLinear": "tgolf.nn.ternary:TernaryLinear",
    "QATLinear": "tgolf.nn.quant:QATLinear",
    "FP8Linear": "tgolf.nn.quant:FP8Linear",
    "MLP": "tgolf.nn.mlp:MLP",
    "FusedMLP": "tgolf.nn.mlp:FusedMLP",
    "CausalSelfAttention": "tgolf.nn.attention:CausalSelfAttention",
    "LinearAttention": "tgolf.nn.linear_attention:LinearAttention",
    "HybridAttention": "tgolf.nn.linear_attention:HybridAttention",
}

_ATTENTIONS = {"softmax": "CausalSelfAttention", "linear": "LinearAttention", "hybrid": "HybridAttention"}
_MLPS = {"reference": "MLP", "fused": "FusedMLP"}
_LOSSES = {
    "reference": "tgolf.ops.loss.reference:softcap_cross_entropy_reference",
    "fused": "tgolf.ops.loss:softcap_cross_entropy",
}


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def __getattr__(name: str) -> Any:  # lazy `from tgolf.nn import TernaryLinear`
    if name in _MODULES:
        return _load(_MODULES[name])
    raise AttributeError(f"module 'tgolf.nn' has no attribute {name!r}")


def make_linear(kind: str, in_features: int, out_features: int, bias: bool = False, **options) -> nn.Module:
    """A linear layer of kind ``Config.linear``: bf16 (nn.Linear, bf16 under autocast) | qat4..qat8 | fp8 | ternary,
    with the kind's options (``tgolf.config.parse_linear_kind``: ``ternary-g128``, ``fp8-row``) and ``options``
    (constructor arguments of the layer, e.g. ``act_bits=8``; they win over the kind's)."""
    family, parsed = parse_linear_kind(kind)
    options = {**parsed, **options}
    if family == "bf16":
        if options:
            raise ValueError(f"linear kind {kind!r} (nn.Linear) takes no layer options, got {sorted(options)}")
        return nn.Linear(in_features, out_features, bias=bias)
    if family == "fp8":
        return _load(_MODULES["FP8Linear"])(in_features, out_features, bias=bias, **options)
    if family == "ternary":
        return _load(_MODULES["TernaryLinear"])(in_features, out_features, bias=bias, **options)
    return _load(_MODULES["QATLinear"])(in_features, out_features, bias=bias, bits=int(family[3:]), **options)


def make_mlp(kind: str, dim: int, hidden: int, *, activation: str, negative_slope: float, linear: str) -> nn.Module:
    if kind not in _MLPS:
        raise ValueError(f"mlp kind {kind!r}: expected one of {sorted(_MLPS)}")
    cls = _load(_MODULES[_MLPS[kind]])
    return cls(dim, hidden, activation=activation, negative_slope=negative_slope, linear=linear)


def make_attention(kind: str, dim: int, *, num_heads: int, num_kv_heads: int, rope_base: float,
                   qk_gain_init: float, linear: str, window: int, feature_map: str = "identity",
                   decay: str = "head", rope_dims: int = 0, xsa: bool = False) -> nn.Module:
    """``feature_map`` and ``decay`` configure the linear part of the `linear` and `hybrid` kinds; ``xsa``
    (exclusive self attention) is for `softmax` only."""
    if kind not in _ATTENTIONS:
        raise ValueError(f"attention kind {kind!r}: expected one of {sorted(_ATTENTIONS)}")
    if xsa and kind != "softmax":
        raise ValueError(f"attention kind {kind!r}: xsa applies to softmax attention only")
    cls = _load(_MODULES[_ATTENTIONS[kind]])
    extra = {"xsa": xsa} if kind == "softmax" else {"feature_map": feature_map, "decay": decay}
    return cls(dim, num_heads=num_heads, num_kv_heads=num_kv_heads, rope_base=rope_base,
               qk_gain_init=qk_gain_init, linear=linear, window=window, rope_dims=rope_dims, **extra)


def get_loss(kind: str) -> Callable:
    """``loss(hidden [N, D], weight [V, D], targets [N], softcap, reduction="mean"|"none")``."""
    if kind not in _LOSSES:
        raise ValueError(f"loss kind {kind!r}: expected one of {sorted(_LOSSES)}")
    return _load(_LOSSES[kind])


__all__ = ["make_linear", "make_mlp", "make_attention", "get_loss", *_MODULES]
