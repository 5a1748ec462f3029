"""Plain-PyTorch definition of the MLP block: fc, squared (leaky) ReLU, proj; and its activation gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def activation_slope(activation: str, negative_slope: float = 0.5) -> float:
    """The negative-side slope of the squared activation: 0 for relu², ``negative_slope`` for LeakyReLU²."""
    if activation == "relu2":
        return 0.0
    if activation == "leaky_relu2":
        return float(negative_slope)
    raise ValueError(f"activation {activation!r}: expected 'relu2' or 'leaky_relu2'")


def squared_activation(x: torch.Tensor, activation: str, negative_slope: float = 0.5) -> torch.Tensor:
    """relu(x)² or leaky_relu(x, slope)²."""
    if activation == "relu2":
        return F.relu(x).square()
    if activation == "leaky_relu2":
        return F.leaky_relu(x, negative_slope).square()
    raise ValueError(f"activation {activation!r}: expected 'relu2' or 'leaky_relu2'")


def mlp_reference(x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor, activation: str = "relu2",
                  negative_slope: float = 0.5) -> torch.Tensor:
    """``proj(act(fc(x)))``: x [..., D], fc_weight [H, D], proj_weight [Dout, H] → [..., Dout]."""
    return F.linear(squared_activation(F.linear(x, fc_weight), activation, negative_slope), proj_weight)


def sq_act_grad_reference(grad_out: torch.Tensor, proj_weight: torch.Tensor, h: torch.Tensor,
                          slope: float) -> torch.Tensor:
    """``(grad_out @ proj_weight) * act'(h)``, ``act'(h) = 2h·(1 if h > 0 else slope²)``; fp32 math, h's dtype."""
    grad_a = grad_out.float() @ proj_weight.float()
    hf = h.float()
    return (grad_a * 2 * hf * torch.where(hf > 0, 1.0, slope * slope)).to(h.dtype)
