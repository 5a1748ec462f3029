"""The trained float weights of a run, kept so that its export can be redone without training again.

A contest run spends its 600 s on 8×H100 before the export starts; which bits, GPTQ, clip search or low-rank
corrections fit 16,000,000 bytes best is then a question for a CPU or one GPU (``python -m tgolf.export``).
``--save-trained`` writes ``<run>/trained.pt`` right before the export: the weights the export starts from (the
moving average when the run keeps one) and the run's config. It loads with ``torch.load(weights_only=True)``:
tensors, strings and numbers only, no pickled code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from tgolf.config import Config

FORMAT = "tgolf-trained-1"


def save_trained(path: str | os.PathLike, model: nn.Module, config: Config) -> None:
    """Write ``model``'s float state and ``config`` to ``path`` atomically (an existing file is replaced: it is the
    same run's)."""
    from tgolf.export.quantize import unwrap_model

    path = Path(path)
    state = {name: tensor.detach().cpu() for name, tensor in unwrap_model(model).state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, "config": config.to_dict(), "state": state}, tmp)
    os.replace(tmp, path)


def load_trained(path: str | os.PathLike) -> tuple[nn.Module, Config]:
    """(the model as it was trained, with its weights, in eval mode on the CPU; its Config)."""
    from tgolf.model import build_model

    try:
        saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several kinds for a file that is not a torch.save archive
        raise ValueError(f"trained weights {path}: not a file written by --save-trained ({exc})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"trained weights {path}: field 'format' is not {FORMAT!r}")
    config = Config.from_dict(saved["config"])
    model = build_model(config)
    try:
        model.load_state_dict(saved["state"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"trained weights {path} do not match the model their config builds: {exc}") from None
    return model.eval(), config


__all__ = ["save_trained", "load_trained"]
