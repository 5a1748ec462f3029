"""Plain-PyTorch definition of the softcapped cross-entropy with a tied lm head (baseline train_gpt.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def softcap_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                    softcap: float = 30.0, reduction: str = "mean") -> torch.Tensor:
    """``CE(softcap * tanh((hidden @ weight.T) / softcap), targets)`` with fp32 logits.

    hidden [N, D], weight [V, D], targets [N] int64; softcap <= 0 disables the cap.
    """
    logits = F.linear(hidden, weight).float()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction=reduction)
