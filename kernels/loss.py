"""Triton kernel of the fused softcapped cross-entropy: the elementwise part over one chunk of logits.

``softcap_ce_chunk(logits [n, V], targets [n], softcap, grad_scale) -> loss [n] (fp32)``, with the logits chunk
(bf16 or fp32, computed by cuBLAS) overwritten IN PLACE by its gradient:

    z = softcap·tanh(logits / softcap)            (softcap <= 0: z = logits)
    loss = logsumexp(z) − z[target]
    logits ← grad_scale · (softmax(z) − onehot(target)) · (1 − tanh²)

Same semantics as the CUDA op ``torch.ops.tgolf.softcap_ce_chunk_cuda`` and the PyTorch
``softcap_ce_chunk_reference``. One program per row; a row of at most ``_MAX_BLOCK_V`` logits is read once and
kept in registers, a longer one is swept twice (online logsumexp, then the gradient). A target outside [0, V)
gives a NaN loss (no host sync to check it on the GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 8192


@triton.jit
def _tanh(x):
    # tanh from exp (tl has no portable tanh across triton 3.6-3.9): exact limits ±1, absolute error ~1e-7.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(raw, softcap, inv_softcap, HAS_CAP: tl.constexpr):
    """(capped logits, softcap derivative 1 − tanh²) in fp32."""
    raw = raw.to(tl.float32)
    if HAS_CAP:
        t = _tanh(raw * inv_softcap)
        return softcap * t, 1.0 - t * t
    return raw, tl.full(raw.shape, 1.0, tl.float32)


@triton.jit
def _softcap_ce_chunk_kernel(logits_ptr, targets_ptr, loss_ptr, V, stride_row, softcap, inv_softcap, grad_scale,
                             HAS_CAP: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = (target >= 0) & (target < V)
    cols = tl.arange(0, BLOCK_V)
    # The target's logit is picked out of the blocks the reductions read, before any store: no other thread
    # can have overwritten it with its gradient yet.

    if ONE_BLOCK:
        mask = cols < V
        z, dcap = _capped(tl.load(base + cols, mask=mask, other=0.0), softcap, inv_softcap, HAS_CAP)
        z = tl.where(mask, z, float("-inf"))
        row_max = tl.max(z, axis=0)
        e = tl.exp(z - row_max)
        total = tl.sum(e, axis=0)
        lse = row_max + tl.log(total)
        z_target = tl.sum(tl.where(cols == target, z, 0.0), axis=0)
        grad = (e / total - tl.where(cols == target, 1.0, 0.0)) * dcap * grad_scale
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)
    else:
        # Online logsumexp over blocks of the row, then a second sweep writes the gradient.
        row_max = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
        total = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
        z_target = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = _capped(tl.load(base + start + cols, mask=mask, other=0.0), softcap, inv_softcap, HAS_CAP)[0]
            z = tl.where(mask, z, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(z, axis=0))
            total = total * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            row_max = new_max
            z_target += tl.sum(tl.where(start + cols == target, z, 0.0), axis=0)
        lse = row_max + tl.log(total)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z, dcap = _capped(tl.load(base + start + cols, mask=mask, other=0.0), softcap, inv_softcap, HAS_CAP)
            onehot = tl.where(start + cols == target, 1.0, 0.0)
            grad = (tl.exp(z - lse) - onehot) * dcap * grad_scale
            tl.store(base + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)

    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, float("nan")))


def softcap_ce_chunk(logits: torch.Tensor, targets: torch.Tensor, softcap: float, grad_scale: float,
                     loss: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row loss [n] fp32; ``logits`` [n, V] (unit column stride) is overwritten with its scaled gradient."""
    n, vocab = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32) if loss is None else loss
    if n == 0:
        return loss
    block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
    has_cap = softcap > 0
    _softcap_ce_chunk_kernel[(n,)](
        logits, targets, loss, vocab, logits.stride(0), float(softcap), 1.0 / softcap if has_cap else 1.0,
        float(grad_scale), HAS_CAP=has_cap, ONE_BLOCK=vocab <= block_v, BLOCK_V=block_v,
        num_warps=8 if block_v >= 4096 else 4)
    return loss
