"""Feature maps φ applied to q and k before linear attention, and the key-sum normaliser.

Linear attention replaces softmax(q·k) by φ(q)·φ(k). Maps with non-negative features (elu+1, ReLU, Taylor,
Hedgehog) are used with a normaliser, o_t = Σ_s w_ts φ(q_t)·φ(k_s) v_s / (Σ_s w_ts φ(q_t)·φ(k_s) + eps), so the
output is a weighted mean of the values (Katharopoulos et al. 2020). The identity map is used without it (signed
scores; the module normalises the output instead, as RetNet/GLA do).

The normaliser costs no extra kernel: append a column of ones to v. The op then returns, in that last column,
Σ_s w_ts φ(q_t)·φ(k_s), the same decayed, causal sum that weights the values, and the state carries the running
(decayed) key sum Σ_s w_s φ(k_s) in that column, so streaming and document resets stay right for free.
``with_key_sum`` / ``divide_by_key_sum`` are the two halves of this trick.

Maps take and return [..., D] → [..., out_dim(D)] along the last dimension, so they work in any head layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureMap(nn.Module):
    """Base: ``normalize`` says whether the key-sum normaliser should follow the map."""

    normalize = True

    def out_dim(self, head_dim: int) -> int:
        return head_dim


class IdentityMap(FeatureMap):
    normalize = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class EluPlusOne(FeatureMap):
    """φ(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0


class ReluMap(FeatureMap):
    """φ(x) = relu(x) ≥ 0 (may give an all-zero denominator: the normaliser's eps covers it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class TaylorMap(FeatureMap):
    """Second-order Taylor map (Based, Arora et al. 2024): φ(q)·φ(k) = 1 + q·k/√D + (q·k)²/(2D) ≈ exp(q·k/√D).

    φ(x) = [1, x', vec(x' x'ᵀ)/√2] with x' = x / D^¼, so out_dim = 1 + D + D²: meant for small head dims
    (Based projects to 16 features). 1 + y + y²/2 > 0 for every y, so the normaliser is safe.
    """

    def out_dim(self, head_dim: int) -> int:
        return 1 + head_dim + head_dim * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / x.shape[-1] ** 0.25
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) * (1.0 / math.sqrt(2.0))
        return torch.cat((torch.ones_like(x[..., :1]), x, outer), dim=-1)


class HedgehogMap(FeatureMap):
    """Learnable map (Hedgehog, Zhang et al. 2024): z = W x, φ(x) = [softmax(z), softmax(−z)] over features.

    W [feature_dim, D] is shared by the heads and starts as the identity (zero-padded or truncated), so at init
    φ(q)·φ(k) is a spiky, exp-like similarity; both signs keep the information softmax(z) alone would lose.
    out_dim = 2 · feature_dim.
    """

    def __init__(self, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.feature_dim = feature_dim or head_dim
        self.proj = nn.Linear(head_dim, self.feature_dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(self.feature_dim, head_dim))

    def out_dim(self, head_dim: int) -> int:
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)
        return torch.cat((torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)), dim=-1).to(x.dtype)


FEATURE_MAPS = ("identity", "elu1", "relu", "taylor", "hedgehog")


def make_feature_map(name: str, head_dim: int) -> FeatureMap:
    if name == "identity":
        return IdentityMap()
    if name == "elu1":
        return EluPlusOne()
    if name == "relu":
        return ReluMap()
    if name == "taylor":
        return TaylorMap()
    if name == "hedgehog":
        return HedgehogMap(head_dim)
    raise ValueError(f"feature_map {name!r}: expected one of {FEATURE_MAPS}")


def with_key_sum(v: torch.Tensor) -> torch.Tensor:
    """v [..., Dv] → [..., Dv + 1]: the ones column whose output is the normaliser (see the module docstring)."""
    return torch.cat((v, torch.ones_like(v[..., :1])), dim=-1)


def divide_by_key_sum(o: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """o [..., Dv + 1] from values extended by ``with_key_sum`` → the normalised output [..., Dv]."""
    return o[..., :-1] / (o[..., -1:] + eps)


__all__ = ["FeatureMap", "IdentityMap", "EluPlusOne", "ReluMap", "TaylorMap", "HedgehogMap", "FEATURE_MAPS",
           "make_feature_map", "with_key_sum", "divide_by_key_sum"]
