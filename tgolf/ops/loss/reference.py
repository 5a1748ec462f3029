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


def softcap_ce_chunk_reference(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                               grad_scale: float) -> torch.Tensor:
    """The elementwise part of the chunked fused loss, in PyTorch (same contract as the Triton/CUDA kernels).

    logits [n, V] (bf16 or fp32) are overwritten IN PLACE by
    ``grad_scale · (softmax(z) − onehot(targets)) · dz/dlogits`` with ``z`` the capped logits;
    returns the per-row loss ``logsumexp(z) − z[target]`` [n] in fp32.
    """
    z = logits.float()
    dcap = None
    if softcap > 0:
        t = torch.tanh(z / softcap)
        z, dcap = softcap * t, 1.0 - t * t
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    grad = torch.exp(z - lse[:, None])
    grad.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    if dcap is not None:
        grad *= dcap
    logits.copy_(grad * grad_scale)
    return loss
