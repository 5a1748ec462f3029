"""The artifact: quantize → serialize → compress → file, its byte accounting, the 16 MB guard, and the reload.

An artifact file is the compression container (tgolf.export.compress) around a model file (tgolf.export.format).
``artifact_bytes = model_bytes + code_bytes`` where ``model_bytes`` is the size of that file on disk and
``code_bytes`` the tgolf sources the run imported (tgolf.export.codebytes), by default as the one
self-extracting script a submission ships (tgolf.export.codepack); the contest caps the sum at
16,000,000 bytes. The scored model is ``load_artifact``'s: a dense GPT (nn.Linear everywhere) built from the
stored config and loaded with the dequantized weights, so a ternary or QAT model reloads as its quantized forward.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch.nn as nn

import tgolf
from tgolf.config import ENTROPY_CODERS, Config
from tgolf.export.codebytes import CodeBytes, count_code_bytes
from tgolf.export.compress import compress, decompress
from tgolf.export.format import deserialize, serialize
from tgolf.export.quantize import (BASELINE_CLIP_QUANTILE, SMALL_NUMEL, QuantTensor, dequantize_model,
                                   quantize_model)
from tgolf.model import GPT, build_model

ARTIFACT_LIMIT = 16_000_000  # decimal bytes: code + compressed model


class BudgetExceeded(RuntimeError):
    """The artifact is over the contest's byte limit."""


@dataclass(frozen=True)
class ArtifactInfo:
    path: str
    scheme: str  # export scheme of the plain float matrices (int4..int8)
    compressor: str  # the one kept
    entropy_coder: str  # how the int codes are stored: "rans" (tgolf.export.rans) or "none" (bytes)
    raw_bytes: int  # serialized model file before compression
    model_bytes: int  # the artifact file on disk
    code_bytes: int
    artifact_bytes: int  # model_bytes + code_bytes: what the 16,000,000-byte cap applies to
    compressed_sizes: dict[str, int] = field(default_factory=dict)  # container size per compressor tried
    params_by_scheme: dict[str, int] = field(default_factory=dict)  # stored elements per scheme
    code_files: tuple[tuple[str, int], ...] = ()  # (file, bytes): the sources behind code_bytes
    code_pack: str = "none"  # "lzma": code_bytes is their packed script's size (tgolf.export.codepack)
    code_bytes_raw: int = 0  # the files' bytes as they are
    code_not_packed: str = ""  # why a requested pack was not made

    def with_code(self, code: CodeBytes) -> "ArtifactInfo":
        """This artifact accounted with ``code`` (counted later in the run, once all its code has been imported)."""
        return replace(self, code_bytes=code.total, artifact_bytes=self.model_bytes + code.total,
                       code_files=code.files, code_pack=code.pack, code_bytes_raw=code.raw,
                       code_not_packed=code.not_packed)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["code_files"] = [list(item) for item in self.code_files]
        return out


def _config_dict(config: Any) -> dict[str, Any]:
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def write_artifact(path: str | os.PathLike, model: nn.Module, config: Any, scheme: str = "int8",
                   compressor: str = "best", *, overwrite: bool = False, small_numel: int = SMALL_NUMEL,
                   small_dtype: str = "fp16", clip_quantile: float | None = BASELINE_CLIP_QUANTILE,
                   code: CodeBytes | None = None, hessians: Mapping[str, Any] | None = None,
                   schemes: Mapping[str, str] | None = None, clip_search: Sequence[float] = (),
                   lowrank_ranks: Mapping[str, int] | None = None, lowrank_scheme: str = "int4",
                   clip_sigmas: Mapping[str, float] | None = None, entropy_coder: str = "rans") -> ArtifactInfo:
    """Quantize ``model``, write the compressed artifact to ``path`` atomically and account for its bytes.

    ``config`` is the run's tgolf Config (or its ``to_dict()``); the reload rebuilds the model from it.
    An existing file is never replaced unless ``overwrite=True``. ``code`` defaults to ``count_code_bytes()``
    packed as the config's ``code_pack`` says (call this in the process that trained). ``hessians`` turns on
    GPTQ for those matrices, ``schemes`` gives some matrices their own bits, ``clip_search`` searches each
    row's clip, ``clip_sigmas`` gives some matrices SDClip's scales and ``lowrank_ranks`` adds low-rank
    corrections of some rounding errors (see quantize_model). ``entropy_coder="rans"`` stores the codes
    rANS-coded with histograms of each matrix's own codes (tgolf.export.rans), "none" as bytes for the compressor.
    The artifact is decompressed and compared before it is kept.
    """
    path = Path(path)
    if entropy_coder not in ENTROPY_CODERS:
        raise ValueError(f"entropy_coder={entropy_coder!r}: expected one of {ENTROPY_CODERS}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"artifact {path} already exists; pass overwrite=True to replace it")
    qtensors = quantize_model(model, scheme, small_numel=small_numel, small_dtype=small_dtype,
                              clip_quantile=clip_quantile, hessians=hessians, schemes=schemes,
                              clip_search=clip_search, lowrank_ranks=lowrank_ranks, lowrank_scheme=lowrank_scheme,
                              clip_sigmas=clip_sigmas)
    meta = {"tgolf_version": tgolf.__version__, "export_scheme": scheme, "small_dtype": small_dtype,
            "clip_quantile": None if clip_search else clip_quantile, "clip_search": list(clip_search),
            "gptq_tensors": len(hessians or {})}
    if clip_sigmas:
        meta["clip_sigmas"] = dict(clip_sigmas)
    corrected = sum(qt.correction is not None for qt in qtensors.values())
    if corrected:
        meta.update(lowrank_tensors=corrected, lowrank_scheme=lowrank_scheme)
    blob = serialize(qtensors, _config_dict(config), meta, entropy_code=entropy_coder == "rans")
    container, chosen, sizes = compress(blob, compressor)
    if decompress(container)[0] != blob:  # never keep an artifact that does not read back
        raise RuntimeError(f"artifact: the {chosen} stream did not decompress to the serialized model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(container)
            f.flush()
            os.fsync(f.fileno())
        if path.exists() and not overwrite:
            raise FileExistsError(f"artifact {path} appeared while writing; pass overwrite=True to replace it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if code is None:
        settings = _config_dict(config)
        code = count_code_bytes(pack=settings.get("code_pack", Config.code_pack), config=settings)
    model_bytes = path.stat().st_size
    params: dict[str, int] = {}
    for qt in qtensors.values():
        for part in (qt, *(qt.correction or ())):
            params[part.scheme] = params.get(part.scheme, 0) + part.numel
    info = ArtifactInfo(path=str(path), scheme=scheme, compressor=chosen, entropy_coder=entropy_coder,
                        raw_bytes=len(blob),
                        model_bytes=model_bytes, code_bytes=0, artifact_bytes=model_bytes, compressed_sizes=sizes,
                        params_by_scheme=params)
    return info.with_code(code)


def check_budget(info: ArtifactInfo | Mapping[str, Any], limit: int = ARTIFACT_LIMIT) -> None:
    """Raise BudgetExceeded, with the byte breakdown, when the artifact is over ``limit`` bytes."""
    values = info if isinstance(info, Mapping) else asdict(info)
    total, model_bytes, code_bytes = (values.get(k) for k in ("artifact_bytes", "model_bytes", "code_bytes"))
    if not isinstance(total, int) or not isinstance(model_bytes, int) or not isinstance(code_bytes, int):
        raise ValueError(f"check_budget: artifact_bytes, model_bytes and code_bytes must be integers, got "
                         f"{total!r}, {model_bytes!r}, {code_bytes!r}")
    if total != model_bytes + code_bytes:
        raise ValueError(f"check_budget: artifact_bytes {total} != model_bytes {model_bytes} + code_bytes {code_bytes}")
    if total > limit:
        raise BudgetExceeded(f"artifact is {total:,} bytes (model {model_bytes:,} + code {code_bytes:,}), over the "
                             f"{limit:,}-byte limit by {total - limit:,}; no submission is written")


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, QuantTensor], dict[str, Any], dict[str, Any]]:
    """(tensors, config dict, meta with the compressor added) from an artifact file, fully validated."""
    blob, compressor = decompress(Path(path).read_bytes())
    tensors, config, meta = deserialize(blob)
    return tensors, config, {**meta, "compressor": compressor}


def load_artifact(path: str | os.PathLike, device: str = "cpu") -> tuple[GPT, Config]:
    """(dense GPT in eval mode with the artifact's weights, its tgolf Config), from the file alone."""
    tensors, config_dict, _ = read_artifact(path)
    config = Config.from_dict(config_dict)
    model = build_model(config, linear="bf16")
    state = dequantize_model(tensors)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"artifact {path} does not match the model its config builds: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"artifact {path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), config
