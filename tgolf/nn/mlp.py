"""MLP blocks: the baseline's reference MLP (two linears and relu² or LeakyReLU²), and the fused one."""
from __future__ import annotations

import torch
import torch.nn as nn

from tgolf.nn import make_linear
from tgolf.ops.mlp import fused_mlp
from tgolf.ops.mlp.reference import squared_activation

__all__ = ["MLP", "FusedMLP", "squared_activation"]


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


def _plain_linear(module: nn.Module) -> bool:
    # Exactly nn.Linear without bias: a subclass (a quantized drop-in) has its own forward that must run.
    return type(module) is nn.Linear and module.bias is None


class FusedMLP(MLP):
    """MLP with the up-projection and squared activation fused in one Triton GEMM (see tgolf.ops.mlp).

    Same constructor, parameters and state dict as :class:`MLP`. The fused op needs plain weights, so it runs
    when ``fc`` and ``proj`` are bias-free ``nn.Linear`` (``linear="bf16"``); with a quantized linear
    (qat4..qat8, fp8, ternary) the module's own linears run and the activation is the reference composition,
    which torch.compile fuses into one elementwise kernel. Under autocast the op runs in the autocast dtype,
    as ``nn.Linear`` would.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_plain_linear(self.fc) and _plain_linear(self.proj)):
            return super().forward(x)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        return fused_mlp(x.to(dtype), self.fc.weight.to(dtype), self.proj.weight.to(dtype), self.activation,
                         self.negative_slope)
