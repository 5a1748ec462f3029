"""Quantize a model's state for export, and undo it for the reload.

What each state entry becomes (``quantize_model``):

* the ``weight`` of a module exposing ``ternary_weight()`` (TernaryLinear) or ``quantized_weight()``
  (QATLinear): exactly the module's own codes and scales, scheme ``"ternary"`` or ``"qat<bits>"``, with the
  module's ``group_size`` attribute (None = one scale per row). Its ``bias`` is kept as a float; any other state of
  such a module (latent caches, counters) is training state and is dropped: the reload is the dense
  ``nn.Linear`` the module stands for, so it computes the same quantized forward the module trained with;
* non-float tensors: kept bit for bit (scheme ``"raw"``);
* float tensors that are not 2-D or have at most ``small_numel`` elements (65,536, as in the baseline): kept as
  fp16 (scheme ``"fp16"``), or fp32 (``"fp32"``) when ``small_dtype="fp32"`` or when a value exceeds the fp16
  range (|x| > 65504) and fp16 would overflow to inf. fp16 halves their bytes; they are ~0.1% of the baseline's
  parameters, and the fp16 rounding is part of the quantized model that the roundtrip is compared with;
* every other float matrix (attention and MLP matrices of a dense model, the tied embedding): per-row symmetric
  int<bits> with the shared quantizer ``tgolf.ops.quant.reference.quantize_weight`` and the baseline's clip at the
  99.99984th percentile of |w| in each row (scheme ``"int<bits>"``; ``schemes`` gives some their own bits, e.g.
  the embedding). With ``clip_search`` each row instead takes, of those clip quantiles, the one whose round trip
  has the least squared error (the records' "GPTQ-lite": ``CLIP_SEARCH_QUANTILES``). A matrix named in
  ``clip_sigmas`` takes the later records' "SDClip" instead: its rows' scales are that many standard deviations
  over qmax, *not* capped at the row's absmax, so a large multiple rounds to a coarser grid whose codes compress
  better (scripts built on the 1.0810 stack: 12.85 for the matrices, 20 for the embedding). A matrix with an input
  second moment in ``hessians`` keeps those scales and takes its codes from GPTQ (``tgolf.export.gptq``). A matrix
  named in ``lowrank_ranks`` also carries a low-rank int correction of its rounding error (``tgolf.export.lowrank``).

Scales are float32 values exactly representable in fp16 (the quantizer rounds them through fp16; codes and scales
taken from modules are checked), so the file stores them as fp16 without changing a single output.
Non-finite values anywhere raise a ValueError naming the tensor: a NaN would otherwise poison a whole row.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from tgolf.ops.quant.reference import FP16_TINY, dequantize_weight, qmax_for_bits, quantize_weight

BASELINE_CLIP_QUANTILE = 0.9999984  # the baseline's 99.99984th percentile of |w| per row
# The five clip quantiles the records' "GPTQ-lite" export searches per row (openai/parameter-golf, the 1.1233
# record, PR #414, and the stacks after it).
CLIP_SEARCH_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
SMALL_NUMEL = 65_536
FP16_MAX = 65504.0
_QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger inputs: quantize big matrices in row chunks
_INT_SCHEME = re.compile(r"(int|qat)([4-8])")


@dataclass
class QuantTensor:
    """One exported tensor. Float and raw schemes use ``data``; quantized schemes use ``codes`` and ``scales``.

    scheme: "fp16" | "fp32" | "raw" | "int4".."int8" | "qat4".."qat8" | "ternary"
    codes:  int8 [N, K]; scales: float32 [N, G] with G = ceil(K / group_size) (G = 1 when group_size is None).
    correction: for an int matrix, an optional low-rank term (up [r, N], down [r, K], both int schemes) that
    ``dequantize`` adds as upᵀ · down (tgolf.export.lowrank).
    """

    scheme: str
    shape: tuple[int, ...]
    data: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    group_size: int | None = None
    correction: tuple["QuantTensor", "QuantTensor"] | None = None

    @property
    def bits(self) -> int | None:
        """Bits of the integer codes (2 for ternary), None for float and raw schemes."""
        return scheme_bits(self.scheme)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 tensor (raw tensors keep their dtype)."""
        if self.codes is None:
            return self.data.clone() if self.scheme == "raw" else self.data.float()
        weight = dequantize_weight(self.codes, self.scales, self.group_size).reshape(self.shape)
        if self.correction is not None:
            up, down = self.correction
            weight = weight + up.dequantize().T @ down.dequantize()
        return weight


def scheme_bits(scheme: str) -> int | None:
    """Code bits of a scheme; None for fp16/fp32/raw. Unknown schemes raise ValueError."""
    if scheme in ("fp16", "fp32", "raw"):
        return None
    if scheme == "ternary":
        return 2
    match = _INT_SCHEME.fullmatch(scheme)
    if match is None:
        raise ValueError(f"scheme {scheme!r}: expected fp16, fp32, raw, int4..int8, qat4..qat8 or ternary")
    return int(match.group(2))


def code_range(scheme: str) -> tuple[int, int]:
    """The inclusive range codes of a quantized scheme may take."""
    bits = scheme_bits(scheme)
    if bits is None:
        raise ValueError(f"scheme {scheme!r} has no integer codes")
    qmax = 1 if scheme == "ternary" else qmax_for_bits(bits)
    return -qmax, qmax


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers (their state names differ)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"tensor {name!r} contains NaN or inf values; refusing to export it")


def _keep_float(name: str, tensor: torch.Tensor, small_dtype: str) -> QuantTensor:
    _check_finite(name, tensor)
    overflow = tensor.numel() > 0 and float(tensor.abs().max()) > FP16_MAX
    dtype, scheme = (torch.float32, "fp32") if small_dtype == "fp32" or overflow else (torch.float16, "fp16")
    return QuantTensor(scheme, tuple(tensor.shape), data=tensor.detach().to("cpu", dtype).contiguous())


def quantize_rows(weight: torch.Tensor, bits: int, clip_quantile: float | None,
                  clip_search: Sequence[float] = (), clip_sigmas: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``quantize_weight`` of a 2-D matrix of any size (row chunks stay under torch.quantile's limit).
    With ``clip_search`` (clip quantiles), each row takes the candidate with the least squared round-trip error
    (the first of equals), and ``clip_quantile`` is unused. With ``clip_sigmas`` (SDClip), each row's scale is
    ``clip_sigmas`` × its standard deviation / qmax, uncapped, and the other two are unused."""
    if clip_sigmas is not None:
        if not clip_sigmas > 0:
            raise ValueError(f"clip_sigmas={clip_sigmas}: must be > 0")
        qmax = qmax_for_bits(bits)
        w = weight.detach().float()
        scales = (clip_sigmas * w.std(dim=1, keepdim=True) / qmax).clamp_min(FP16_TINY).to(torch.float16).float()
        return torch.round(w / scales).clamp_(-qmax, qmax).to(torch.int8).cpu(), scales.cpu()
    if clip_search:
        best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for quantile in clip_search:
            codes, scales = quantize_rows(weight, bits, quantile)
            error = (dequantize_weight(codes, scales, None) - weight.cpu().float()).square().sum(1)
            if best is None:
                best = codes, scales, error
                continue
            better = error < best[2]
            best = (torch.where(better[:, None], codes, best[0]), torch.where(better[:, None], scales, best[1]),
                    torch.minimum(error, best[2]))
        return best[0], best[1]
    rows_per_chunk = max(1, _QUANTILE_MAX_NUMEL // max(1, weight.shape[1]))
    parts = [quantize_weight(chunk, bits, clip_quantile=clip_quantile) for chunk in weight.split(rows_per_chunk)]
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


def _module_weight(name: str, module: nn.Module) -> QuantTensor:
    """The exact codes and scales a ternary or QAT module trains with, checked for what the format relies on."""
    if hasattr(module, "ternary_weight"):
        codes, scales = module.ternary_weight()
        scheme = "ternary"
    else:
        codes, scales = module.quantized_weight()
        scheme = f"qat{int(module.bits)}"
        scheme_bits(scheme)  # bits outside 4..8 raise here, naming the scheme
    if getattr(module, "act_bits", None):
        warnings.warn(f"{name}: the module quantizes its activations (act_bits={module.act_bits}); the dense reload "
                      f"keeps activations in full precision, so its outputs will differ from the trained forward")
    group_size = getattr(module, "group_size", None)
    group_size = None if group_size is None else int(group_size)
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"{name}: module codes must be int8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    if tuple(scales.shape) != (n, num_groups(k, group_size)):
        raise ValueError(f"{name}: scales shape {tuple(scales.shape)} does not match codes {(n, k)} with "
                         f"group_size={group_size}")
    low, high = code_range(scheme)
    if codes.numel() and (int(codes.min()) < low or int(codes.max()) > high):
        raise ValueError(f"{name}: {scheme} codes outside [{low}, {high}]")
    scales = scales.detach().float()
    _check_finite(name + " (scales)", scales)
    if not torch.equal(scales.half().float(), scales):
        raise ValueError(f"{name}: module scales are not exactly representable in fp16 (round them through fp16 in "
                         f"the quantizer so that the artifact reproduces the trained forward)")
    return QuantTensor(scheme, (n, k), codes=codes.detach().cpu().contiguous(), scales=scales.cpu().contiguous(),
                       group_size=group_size)


def int_bits(scheme: str, what: str) -> int:
    """The bits of an ``int4``..``int8`` scheme; ValueError naming ``what`` otherwise."""
    match = re.fullmatch(r"int([4-8])", scheme)
    if match is None:
        raise ValueError(f"{what}={scheme!r}: expected int4..int8")
    return int(match.group(1))


def embedding_names(model: nn.Module) -> list[str]:
    """State names of the token embeddings (``nn.Embedding``) and of an untied output head ``lm_head``."""
    model = unwrap_model(model)
    names = [f"{prefix}.weight" for prefix, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("lm_head.weight")
    return names


def mlp_matrix_names(model: nn.Module) -> list[str]:
    """State names of the MLP matrices (``blocks.<i>.mlp.fc.weight``, ``....mlp.proj.weight``)."""
    return [name for name, tensor in unwrap_model(model).state_dict().items()
            if ".mlp." in name and name.endswith(".weight") and tensor.dim() == 2]


def _own_code_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The QAT and ternary layers by module name: they export the codes they trained with, whatever the scheme."""
    return {prefix: m for prefix, m in model.named_modules()
            if hasattr(m, "ternary_weight") or hasattr(m, "quantized_weight")}


def rounded_matrix_names(model: nn.Module, small_numel: int = SMALL_NUMEL) -> list[str]:
    """State names of the float matrices the export rounds to its int schemes: 2-D, over ``small_numel`` elements,
    and not the weight of a QAT or ternary layer."""
    model = unwrap_model(model)
    own = _own_code_modules(model)
    return [name for name, tensor in model.state_dict().items()
            if name.rpartition(".")[0] not in own and tensor.is_floating_point() and tensor.dim() == 2
            and tensor.numel() > small_numel]


def part_schemes(model: nn.Module, embed_scheme: str = "", mlp_scheme: str = "") -> dict[str, str]:
    """``schemes`` for quantize_model: the embeddings' and the MLP matrices' own bits ("" = the export's)."""
    schemes = {name: mlp_scheme for name in mlp_matrix_names(model)} if mlp_scheme else {}
    if embed_scheme:
        schemes.update({name: embed_scheme for name in embedding_names(model)})
    return schemes


def _by_part(model: nn.Module, value: float, embed_value: float, small_numel: int) -> dict[str, float]:
    """``embed_value`` for the embeddings (and an untied head), ``value`` for the other matrices the export
    rounds; zeros left out."""
    embeddings = set(embedding_names(model))
    values = {name: embed_value if name in embeddings else value for name in rounded_matrix_names(model, small_numel)}
    return {name: v for name, v in values.items() if v}


def part_lowrank_ranks(model: nn.Module, rank: int = 0, embed_rank: int = 0,
                       small_numel: int = SMALL_NUMEL) -> dict[str, int]:
    """``lowrank_ranks`` for quantize_model: ``embed_rank`` for the embeddings (and an untied head), ``rank`` for
    the other matrices the export rounds; zero ranks left out."""
    return _by_part(model, rank, embed_rank, small_numel)


def part_clip_sigmas(model: nn.Module, sigmas: float = 0.0, embed_sigmas: float = 0.0,
                     small_numel: int = SMALL_NUMEL) -> dict[str, float]:
    """``clip_sigmas`` for quantize_model, the same way: the embeddings' multiple and the other matrices'."""
    return _by_part(model, sigmas, embed_sigmas, small_numel)


def quantize_model(model: nn.Module, scheme: str = "int8", small_numel: int = SMALL_NUMEL,
                   small_dtype: str = "fp16", clip_quantile: float | None = BASELINE_CLIP_QUANTILE,
                   hessians: Mapping[str, torch.Tensor] | None = None,
                   schemes: Mapping[str, str] | None = None,
                   clip_search: Sequence[float] = (), lowrank_ranks: Mapping[str, int] | None = None,
                   lowrank_scheme: str = "int4", clip_sigmas: Mapping[str, float] | None = None
                   ) -> dict[str, QuantTensor]:
    """Every state entry of ``model`` as a QuantTensor, in state_dict order (see the module docstring).

    ``hessians``: ``{state name: H [K, K]}`` from ``tgolf.export.gptq.collect_hessians``; ``schemes``: ``{state
    name: "int<bits>"}`` for float matrices stored with other bits than ``scheme`` (e.g. the embedding, to which
    the score is the most sensitive; a tensor small enough to stay float ignores it); ``clip_search``: clip
    quantiles searched per row instead of ``clip_quantile`` (see ``quantize_rows``); ``clip_sigmas``: ``{state
    name: k}``, matrices whose scales are SDClip's, k standard deviations over qmax; ``lowrank_ranks``: ``{state
    name: r}``, int matrices that also store a rank-r ``lowrank_scheme`` correction of their rounding error
    (``tgolf.export.lowrank``, aimed by the matrix's hessian when it has one; a tensor that stays float ignores
    it). A hessian for a tensor that is not an int matrix of this export, or a scheme or rank for a name the model
    lacks, raises ValueError.
    """
    bits = int_bits(scheme, "scheme")
    int_bits(lowrank_scheme, "lowrank_scheme")
    ranks = dict(lowrank_ranks or {})
    for name, rank in ranks.items():
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"lowrank_ranks[{name!r}]={rank!r}: must be an integer >= 0 (0 = no correction)")
    tensor_bits = {name: int_bits(value, f"schemes[{name!r}]") for name, value in (schemes or {}).items()}
    sigmas = dict(clip_sigmas or {})
    if small_dtype not in ("fp16", "fp32"):
        raise ValueError(f"small_dtype={small_dtype!r}: expected 'fp16' or 'fp32'")
    model = unwrap_model(model)
    quantized = _own_code_modules(model)
    rounded = set(rounded_matrix_names(model, small_numel))
    hessians = dict(hessians or {})
    out: dict[str, QuantTensor] = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            prefix, _, _ = name.rpartition(".")
            if prefix in quantized:
                module = quantized[prefix]
                key = f"{prefix}.weight" if prefix else "weight"
                if key not in out:  # a quantized linear is exported as the nn.Linear it stands for
                    out[key] = _module_weight(key, module)
                    bias = getattr(module, "bias", None)
                    if bias is not None:
                        bias_key = f"{prefix}.bias" if prefix else "bias"
                        out[bias_key] = _keep_float(bias_key, bias, small_dtype)
                continue
            if not tensor.is_floating_point():
                out[name] = QuantTensor("raw", tuple(tensor.shape), data=tensor.detach().cpu().clone())
            elif name not in rounded:
                out[name] = _keep_float(name, tensor, small_dtype)
            else:
                _check_finite(name, tensor)
                own_bits = tensor_bits.pop(name, bits)
                weight, hessian = tensor.detach().float(), hessians.pop(name, None)
                codes, scales = quantize_rows(weight, own_bits, clip_quantile, clip_search, sigmas.pop(name, None))
                if hessian is not None:
                    from tgolf.export.gptq import gptq_quantize  # only runs that calibrate import (and count) it

                    codes = gptq_quantize(weight, hessian, scales, own_bits).cpu()
                out[name] = QuantTensor(f"int{own_bits}", tuple(tensor.shape), codes=codes, scales=scales)
                rank = ranks.pop(name, 0)
                if rank:
                    from tgolf.export.lowrank import lowrank_correction  # imported (and counted) only when used

                    out[name].correction = lowrank_correction(weight, out[name].dequantize(), rank, lowrank_scheme,
                                                              hessian)
    if hessians:
        raise ValueError(f"hessians given for tensors that are not int matrices of this export: {sorted(hessians)}")
    for what, names in (("schemes", tensor_bits), ("lowrank_ranks", ranks), ("clip_sigmas", sigmas)):
        unknown = sorted(set(names) - set(out))
        if unknown:
            raise ValueError(f"{what} given for tensors the model does not have: {unknown}")
    return out


def dequantize_model(qtensors: Mapping[str, QuantTensor]) -> dict[str, torch.Tensor]:
    """A state dict of float32 tensors (raw tensors keep their dtype) for a dense model's load_state_dict."""
    return {name: qt.dequantize() for name, qt in qtensors.items()}
