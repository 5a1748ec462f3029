"""MLP blocks: the baseline's reference MLP (two linears and relu² or LeakyReLU²), and the fused one."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tgolf.nn import make_linear


def squared_activation(x: torch.Tensor, activation: str, negative_slope: float = 0.5) -> torch.Tensor:
    """relu(x)² or leaky_relu(x, slope)²."""
    if activation == "relu2":
        return F.relu(x).square()
    if activation == "leaky_relu2":
        return F.leaky_relu(x, negative_slope).square()
    raise ValueError(f"activation {activation!r}: expected 'relu2' or 'leaky_relu2'")


class MLP(nn.Module):
    """fc (dim → hidden), squared activation, proj (hidden → dim, zero-initialised)."""

    def __init__(self, dim: int, hidden: int, *, activation: str = "relu2", negative_slope: float = 0.5,
                 linear: str = "bf16"):
        super().__init__()
        squared_activation(torch.zeros(1), activation)  # validate the name now, not at the first forward
        self.activation, self.negative_slope = activation, negative_slope
        self.fc = make_linear(linear, dim, hidden)
        self.proj = make_linear(linear, hidden, dim)
        self.proj.zero_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(squared_activation(self.fc(x), self.activation, self.negative_slope))
