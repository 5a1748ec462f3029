"""GPTQ for the export's per-row integer matrices: the same scales and file format, better rounding decisions.

Round-to-nearest (``quantize_rows``) rounds every weight on its own. GPTQ (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers") rounds the columns of a matrix one after
another and spreads each column's rounding error over the columns not yet rounded, weighted by the inverse of the
layer's input second moment H = E[x xᵀ], so that the layer's *outputs* on real inputs move as little as possible.
Only the codes change: the scales are round-to-nearest's (the same percentile clip), so the artifact and its
reload are unchanged, and with uncorrelated inputs (diagonal H) the codes are exactly round-to-nearest's.

``collect_hessians`` measures H for every bias-free ``nn.Linear`` of a dense model on calibration batches (and for
a tied embedding, from the output head's input); ``gptq_quantize`` quantizes one matrix with its H.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from tgolf.ops.quant.reference import qmax_for_bits

DAMPING = 0.01  # fraction of mean(diag H) added to the diagonal: keeps the Cholesky factorisation stable
BLOCK = 128  # columns per lazy batch update (the paper's block size): same result, fewer large updates


def collect_hessians(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], min_numel: int = 0,
                     inputs_of: Mapping[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] | None = None
                     ) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": H [K, K]}`` (float32): the mean of x xᵀ over every input row x of each plain
    ``nn.Linear`` whose weight has more than ``min_numel`` elements, over ``model(x, y)`` on ``batches``.

    ``inputs_of`` adds matrices used without a module call, by state name and a function ``(model, x) → their
    inputs`` (a tied embedding read by the output head: the final hidden states). The model must call its linears
    as modules (a dense model with the reference MLP does; a fused MLP reads their weights directly and would
    record nothing). Run it on the device that holds the model.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    linears = {f"{prefix}.weight": module for prefix, module in model.named_modules()
               if type(module) is nn.Linear and module.bias is None and module.weight.numel() > min_numel}
    state = model.state_dict()
    for name in inputs_of or {}:
        if name not in state or name in linears:
            raise ValueError(f"inputs_of[{name!r}]: not a state entry of the model, or a linear already measured")
    extra = {name: fn for name, fn in (inputs_of or {}).items() if state[name].numel() > min_numel}
    handles = [module.register_forward_hook(lambda module, args, out, name=name: add(name, args[0]))
               for name, module in linears.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                model(x, y)
                for name, inputs in extra.items():
                    add(name, inputs(model, x))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: total / counts[name] for name, total in sums.items()}


def damped_hessian(hessian: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A float64 copy of ``hessian`` on ``device`` that has a Cholesky factor: inputs that were always zero (their
    weights never matter: each is rounded alone) get a unit diagonal, and every diagonal entry gets ``DAMPING``
    times their mean."""
    h = hessian.detach().to(device, torch.float64).clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    return h


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, bits: int,
                  act_order: bool = True) -> torch.Tensor:
    """int8 codes [N, K] in [-qmax, qmax] for ``weight`` [N, K] with per-row ``scales`` [N, 1] (fixed, e.g.
    round-to-nearest's) and the input second moment ``hessian`` [K, K].

    ``act_order`` rounds the columns with the largest input energy (diag H) first, as the GPTQ authors
    recommend; it changes the order of work, not the format. Computed in float64 on ``weight``'s device.
    """
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian: expected shape {(k, k)} for a weight of shape {(n, k)}, got "
                         f"{tuple(hessian.shape)}")
    if tuple(scales.shape) != (n, 1):
        raise ValueError(f"scales: expected per-row scales of shape {(n, 1)}, got {tuple(scales.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or inf values")
    qmax = qmax_for_bits(bits)
    w = weight.detach().double().clone()
    h = damped_hessian(hessian, w.device)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, order], h[order][:, order]
    # Upper Cholesky factor of H⁻¹: row j holds how column j's error moves the columns after it.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = scales.detach().to(w.device, torch.float32)  # divide in float32, as round-to-nearest does
    codes = torch.empty(n, k, dtype=torch.float64, device=w.device)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        block, errors = w[:, start:stop].clone(), torch.empty(n, stop - start, dtype=torch.float64, device=w.device)
        for j in range(stop - start):
            q = torch.round(block[:, j:j + 1].float() / s).clamp_(-qmax, qmax).double()
            codes[:, start + j:start + j + 1] = q
            err = (block[:, j:j + 1] - q * s.double()) / u[start + j, start + j]
            block[:, j:] -= err * u[start + j, start + j:stop]
            errors[:, j:j + 1] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out.to(torch.int8)
