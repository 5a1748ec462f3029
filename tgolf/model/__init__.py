"""The GPT and how to build it from a Config."""
from __future__ import annotations

from tgolf.model.gpt import GPT, Block, ModelConfig, count_parameters


def build_model(cfg, **overrides) -> GPT:
    """A GPT from a tgolf Config; ``overrides`` replace model fields (e.g. ``linear="bf16"`` for a dense reload)."""
    fields = {**ModelConfig.from_config(cfg).__dict__, **overrides}
    return GPT(ModelConfig(**fields))


__all__ = ["GPT", "Block", "ModelConfig", "build_model", "count_parameters"]
