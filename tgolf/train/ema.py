"""Exponential moving average of the weights, evaluated and exported in place of the last step's.

The records from 1.1271 on (openai/parameter-golf) average every step with decay 0.997, a horizon of ~330 steps:
the last stretch of the warmdown, smoothed. The average is kept in float32 beside the model, updated after each
optimizer step outside the compiled graph (one fused lerp over all parameters), saved in checkpoints, and copied
into the model when training ends.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"WeightEMA: decay={decay} must be in (0, 1)")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """average ← decay · average + (1 − decay) · weights."""
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.average)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: avg.detach().cpu() for name, avg in zip(self.names, self.average)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            missing, unexpected = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise ValueError(f"EMA state: missing {missing}, unexpected {unexpected}")
        for name, avg in zip(self.names, self.average):
            avg.copy_(state[name])
