"""Muon for the 2-D matrices of the blocks, Adam(W) for embeddings, head and scalars (as the baseline).

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers"): SGD momentum whose update is
orthogonalised by a few steps of an odd quintic polynomial (``tgolf.train.orthogonalize``: Newton–Schulz, or the
Polar Express polynomials with ``muon_backend="polar_express"``). Under DDP each rank orthogonalises a disjoint
share of the matrices and one all-reduce of a flat buffer gives every rank every update. MuonEq-R
(arXiv:2603.28254; ``muon_row_normalize``) first scales each row of the update to unit norm: openai/parameter-golf
PR #1260 brought it to the contest, the 1.0810 record (PR #1493) uses it, and in qlabs-eng/slowrun PR #71 it moved
a 59-minute run's loss from 3.214 to 3.211.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from tgolf.train.orthogonalize import muon_polynomials, orthogonalize


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices, in few launches: the baseline's model has ~54 block matrices in 4 shapes, and one
    Newton–Schulz pass per matrix made the step launch-bound (on the 2026-11-27 H100 profile: 2,863 kernels holding
    6.2 ms of GPU work spread over 32.6 ms). Matrices of one shape are orthogonalised together as one batch, and the
    flat update buffer holds each shape's matrices side by side, so a batch lands in it with one copy and the
    weights take it with one foreach add. Under DDP each rank orthogonalises a contiguous share of every shape's
    batch; one all-reduce of the buffer gives every rank every update."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, nesterov: bool = True,
                 weight_decay: float = 0.0, backend: str = "newton_schulz", row_normalize: bool = False):
        muon_polynomials(backend, backend_steps)  # a bad backend fails here, not at the first step
        # not param-group entries: a checkpoint's groups replace the live ones on resume, and these are the
        # run's configuration, not state
        self.backend, self.row_normalize = backend, row_normalize
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in params:
                by_shape.setdefault(p.shape, []).append(p)
            ordered = [p for members in by_shape.values() for p in members]  # the buffer's layout
            flat = torch.zeros(sum(p.numel() for p in ordered), device=ordered[0].device,
                               dtype=torch.bfloat16 if ordered[0].is_cuda else torch.float32)
            start = 0
            for shape, members in by_shape.items():
                lo, hi = rank * len(members) // world, (rank + 1) * len(members) // world  # this rank's share
                if hi > lo:
                    numel = members[0].numel()
                    ortho = self._orthogonalised(group, members[lo:hi])
                    flat[start + lo * numel: start + hi * numel] = ortho.flatten()
                start += len(members) * members[0].numel()
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            updates = flat.to(ordered[0].dtype).split([p.numel() for p in ordered])
            if group["weight_decay"]:  # decoupled, as AdamW: shrink by lr·wd, then take the update
                torch._foreach_mul_(ordered, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(ordered, [u.view_as(p) for u, p in zip(updates, ordered)], alpha=-group["lr"])

    def _orthogonalised(self, group: dict, params: list[torch.Tensor]) -> torch.Tensor:
        """Momentum (Nesterov by default), then one orthogonalisation of the batch of these same-shape matrices,
        scaled to equal RMS across aspect ratios: [len(params), rows, cols]."""
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad)) for p in params]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
        rows, cols = params[0].shape
        stacked = torch.stack(updates)
        if self.row_normalize:  # MuonEq-R; the orthogonalisation normalises the whole matrix after it anyway
            stacked = stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-7)
        ortho = orthogonalize(stacked, muon_polynomials(self.backend, group["backend_steps"]))
        return ortho * max(1.0, rows / cols) ** 0.5


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Group parameters as the baseline: block matrices (Muon), embedding, untied head, scalars/vectors (Adam).
    The bigram and value-embedding tables count as embeddings and their projections as matrices, as in the
    records."""
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        if name.startswith(("tok_emb.", "bigram.table.", "value_embed.table.")):
            groups["embed"].append(p)
        elif name.startswith("lm_head."):
            groups["head"].append(p)
        elif p.ndim == 2 and (name.startswith("blocks.") and name.endswith(".weight")  # not resid_mix etc.
                              or name in ("bigram.proj.weight", "value_embed.proj.weight")):
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


def build_optimizers(cfg, model: nn.Module) -> list[torch.optim.Optimizer]:
    """AdamW (embedding, head, scalars) + Muon (matrices). Each param group remembers its ``base_lr``. Weight decay
    (decoupled; 0 by default, as the baseline) skips an untied head, as the records do."""
    groups = split_parameters(model)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    adam_groups = [
        {"params": groups["embed"], "lr": cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr,
         "weight_decay": cfg.adam_weight_decay},
        {"params": groups["head"], "lr": cfg.head_lr, "weight_decay": 0.0},
        {"params": groups["scalar"], "lr": cfg.scalar_lr, "weight_decay": cfg.adam_weight_decay},
    ]
    adam = torch.optim.AdamW([g for g in adam_groups if g["params"]], betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps, **fused)
    muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                weight_decay=cfg.muon_weight_decay, backend=cfg.muon_backend, row_normalize=cfg.muon_row_normalize)
    optimizers: list[torch.optim.Optimizer] = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def muon_momentum(cfg, step: int) -> float:
    """Momentum warm-up from muon_momentum_warmup_start to muon_momentum over the first steps (baseline)."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def apply_schedule(optimizers: list[torch.optim.Optimizer], lr_scale: float, momentum: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
            if isinstance(opt, Muon):
                group["momentum"] = momentum
