"""Swap the linear layers of a model: to a quantized drop-in (ternary, qat4..qat8, fp8), or back to ``nn.Linear``.

``convert(model, kind, skip=(), **kwargs) -> (model, swapped_names)``. The swap is in place; the model is returned
too because a model that *is* a linear layer can only be replaced, not modified. Names are qualified module names
as in ``model.named_modules()``; ``skip`` holds exact names or fnmatch patterns (``"blocks.0.*"``, ``"*.proj"``).

* to a quantized kind (``Config.linear``'s, options included: ``ternary-g128``): every ``nn.Linear`` (subclasses
  included) that is not already a quantized drop-in is replaced; the new layer takes over the *same* weight and
  bias Parameters (optimizers and ties stay valid). ``kwargs`` go to the new layer's constructor (``group_size=``,
  ``act_bits=`` for ternary).
* ``"dense"`` (alias ``"bf16"``): every quantized drop-in becomes a plain ``nn.Linear`` holding its quantized weight
  (codes × scales), so the dense model's outputs equal the quantized forward. Activation quantization
  (``act_bits=8``) has no dense equivalent: those layers are converted with a warning.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Iterable

import torch
import torch.nn as nn

import tgolf.nn as registry
from tgolf.config import parse_linear_kind
from tgolf.ops.quant.reference import dequantize_weight

DENSE_KINDS = ("dense", "bf16")


def _quantized_types() -> tuple[type, ...]:
    types: list[type] = [registry.TernaryLinear]
    for name in ("QATLinear", "FP8Linear"):
        try:
            types.append(getattr(registry, name))
        except (ImportError, AttributeError):  # written by another family; may be missing
            pass
    return tuple(types)


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _dense_weight(name: str, module: nn.Module) -> torch.Tensor:
    """The weight a quantized layer actually multiplies by, as float32."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().float()
    if hasattr(module, "ternary_weight"):
        codes, scales = module.ternary_weight()
    elif hasattr(module, "quantized_weight"):
        codes, scales = module.quantized_weight()
    else:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) exposes no quantized weight to export")
    return dequantize_weight(codes, scales, getattr(module, "group_size", None))


def _to_dense(name: str, module: nn.Module) -> nn.Linear:
    if getattr(module, "act_bits", None):
        warnings.warn(f"layer {name!r}: act_bits={module.act_bits} activation quantization has no dense "
                      "equivalent; the dense layer's outputs differ by it", stacklevel=3)
    with torch.no_grad():
        weight = _dense_weight(name, module)
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        dense.bias = module.bias
    return dense


def _to_quantized(kind: str, module: nn.Linear, kwargs: dict) -> nn.Module:
    new = registry.make_linear(kind, module.in_features, module.out_features, module.bias is not None, **kwargs)
    new.weight = module.weight
    if module.bias is not None:
        new.bias = module.bias
    return new.to(device=module.weight.device)  # moves any buffers of the new layer; the Parameters stay


def _set(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def convert(model: nn.Module, kind: str, skip: str | Iterable[str] = (), **kwargs) -> tuple[nn.Module, list[str]]:
    """Swap linear layers (see the module docstring); returns ``(model, names of the swapped layers)``."""
    patterns = (skip,) if isinstance(skip, str) else tuple(skip)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"skip={skip!r}: expected layer names or fnmatch patterns (strings)")
    quantized = _quantized_types()
    if kind in DENSE_KINDS:
        if kwargs:
            raise ValueError(f"convert(..., {kind!r}) takes no layer options, got {sorted(kwargs)}")
        wanted = lambda m: isinstance(m, quantized)  # noqa: E731
        make = lambda name, m: _to_dense(name, m)  # noqa: E731
    else:
        try:
            parse_linear_kind(kind)
        except ValueError as exc:
            raise ValueError(f"kind={kind!r}: expected dense, bf16 or a quantized kind ({exc})") from None
        wanted = lambda m: isinstance(m, nn.Linear) and not isinstance(m, quantized)  # noqa: E731
        make = lambda name, m: _to_quantized(kind, m, kwargs)  # noqa: E731
    targets = [(name, m) for name, m in model.named_modules() if wanted(m) and not _skipped(name, patterns)]
    for name, module in targets:
        model = _set(model, name, make(name, module))
    return model, [name for name, _ in targets]
