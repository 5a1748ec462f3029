"""The GPT and how to build it from a Config."""
from __future__ import annotations

import dataclasses

from tgolf.config import Config
from tgolf.model.gpt import GPT, Block, count_parameters


def build_model(cfg: Config, **overrides) -> GPT:
    """A GPT from a tgolf Config; ``overrides`` replace fields (e.g. ``linear="bf16"`` for a dense reload)."""
    return GPT(dataclasses.replace(cfg, **overrides).validate())


__all__ = ["GPT", "Block", "build_model", "count_parameters"]
