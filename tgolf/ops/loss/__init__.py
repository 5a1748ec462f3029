"""Fused softcapped cross-entropy with a tied lm head, in chunks of rows.

``softcap_cross_entropy(hidden [N, D], weight [V, D], targets [N], softcap=30.0, reduction="mean"|"none")`` equals
:func:`softcap_cross_entropy_reference` without ever holding the [N, V] logits: for each chunk of rows,
cuBLAS computes the chunk's logits (in the input dtype), one elementwise kernel (``softcap_ce_chunk``: CUDA op
``torch.ops.tgolf.softcap_ce_chunk_cuda`` → Triton → PyTorch) writes the per-row loss and overwrites the logits
with their gradient, and two GEMMs turn it into ``grad_hidden`` rows and an fp32 ``grad_weight`` accumulator.

* ``reduction="mean"`` with gradients: the gradients are computed in the forward (scaled by 1/N) and the
  backward only multiplies them by the incoming scalar (``tgolf::softcap_ce_mean``).
* ``reduction="none"``, or no gradient needed: the forward computes losses only (``tgolf::softcap_ce_rows``); a
  backward then re-runs the chunks with the per-row incoming gradients (``tgolf::softcap_ce_backward``).

Not supported: ignore_index, label smoothing, double backward. Targets must lie in [0, V): checked on the CPU;
on the GPU (no host sync) an out-of-range target gives a NaN loss from the Triton kernel.
Peak extra memory: one logits chunk (about ``_CHUNK_ELEMENTS`` elements), grad_hidden, and the fp32 grad_weight.
"""
from __future__ import annotations

import functools
import math

import torch

from tgolf.backend import Choice, choose, cuda_op, forced_backend, register_op
from tgolf.ops.loss.reference import softcap_ce_chunk_reference, softcap_cross_entropy_reference

__all__ = ["softcap_cross_entropy", "softcap_cross_entropy_reference", "chunk_rows_for"]

_CUDA_NAME = "softcap_ce_chunk_cuda"
# About 32M logits per chunk (64 MB in bf16), and at least 4 chunks when N is large: big enough that the per-chunk
# grad_weight accumulation and launch costs stay small, small enough that memory stays far below the reference's.
# A guess until measured on a GPU.
_CHUNK_ELEMENTS = 1 << 25
_ROW_MULTIPLE = 128


def chunk_rows_for(n: int, vocab: int) -> int:
    """Rows per chunk for N rows and a vocabulary of V (fixed per shape)."""
    rows = min(_CHUNK_ELEMENTS // max(vocab, 1), math.ceil(n / 4))
    rows = max(_ROW_MULTIPLE, rows // _ROW_MULTIPLE * _ROW_MULTIPLE)
    return max(1, min(rows, n))


# The CUDA chunk kernel against the Triton one on an H100 (profiles/2026-11-27-NVIDIA-H100-80GB-HBM3, N = 65,536,
# forward): 2.46× faster at V = 1024, 0.87× at V = 8192 (D 512 and 768). Vocabularies in between: not measured.
CUDA_MAX_VOCAB = 4096


def _chunk_choice(device: torch.device, vocab: int) -> Choice:
    """The chunk kernel's backend: the CUDA kernel up to CUDA_MAX_VOCAB (or when TGOLF_BACKEND=cuda asks for it).

    Above that the CUDA kernel is not even looked up, so that a run which will not call it does not load the
    extension either: a run that loaded it cannot pack its code (tgolf.export.codepack)."""
    if vocab <= CUDA_MAX_VOCAB or forced_backend() == "cuda":
        return choose(device, cuda_name=_CUDA_NAME)
    other = choose(device)
    if device.type != "cuda":
        return other
    return Choice(other.backend, f"{other.reason}; {_CUDA_NAME} only up to V = {CUDA_MAX_VOCAB}: measured 0.87× the "
                                 "Triton kernel's speed at V = 8192 on an H100")


def _describe(device: torch.device) -> Choice:
    """What ``python -m tgolf.info`` reports: the CUDA kernel's vocabularies and the fallback."""
    small, large = _chunk_choice(device, CUDA_MAX_VOCAB), _chunk_choice(device, CUDA_MAX_VOCAB + 1)
    if small.backend == large.backend:
        return small
    return Choice(small.backend, f"{small.reason} for V ≤ {CUDA_MAX_VOCAB}; larger vocabularies: {large.backend} "
                                 f"({large.reason})")


def _chunk_kernel(device: torch.device, vocab: int):
    """The elementwise chunk function ``(logits, targets, softcap, grad_scale) -> loss`` for this device."""
    backend = _chunk_choice(device, vocab).backend
    if backend == "cuda":
        return cuda_op(_CUDA_NAME)
    if backend == "triton":
        from tgolf.kernels.loss import softcap_ce_chunk

        return softcap_ce_chunk
    return softcap_ce_chunk_reference


@functools.lru_cache(maxsize=None)
def _addmm_into_fp32(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates a bf16 product straight into
    an fp32 matrix here (CUDA, recent torch). Probed once per device on a small case; False elsewhere."""
    if device.type != "cuda":
        return False
    try:
        # small integers (exact in bf16 and in the fp32 sums), and the global RNG left untouched
        a = (torch.arange(64 * 48, device=device) % 7 - 3).reshape(64, 48).bfloat16()
        b = (torch.arange(48 * 40, device=device) % 5 - 2).reshape(48, 40).bfloat16()
        acc = (torch.arange(64 * 40, device=device) % 11).reshape(64, 40).float()
        want = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.equal(acc, want))
    except (RuntimeError, TypeError):
        return False


def _accumulate(grad_weight: torch.Tensor, dlogits: torch.Tensor, h_chunk: torch.Tensor) -> None:
    """``grad_weight (fp32) += dlogitsᵀ @ h_chunk``."""
    if dlogits.dtype == torch.float32:
        grad_weight.addmm_(dlogits.t(), h_chunk)
    elif _addmm_into_fp32(dlogits.device):  # cuBLAS reads and writes the fp32 accumulator in place
        torch.addmm(grad_weight, dlogits.t(), h_chunk, out_dtype=torch.float32, out=grad_weight)
    else:  # a bf16/fp16 product, then an fp32 add (one more [V, D] round trip per chunk)
        grad_weight += dlogits.t() @ h_chunk


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, chunk_rows: int,
             grad_scale: float, row_scale: torch.Tensor | None = None, want_grads: bool = True):
    """(loss [N] fp32, grad_hidden or None, grad_weight or None), one chunk of rows at a time.

    The gradients are ``grad_scale`` (and, if given, ``row_scale[i]`` for row i) times those of the summed loss.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_rows if chunk_rows > 0 else chunk_rows_for(n, vocab)
    kernel = _chunk_kernel(hidden.device, vocab)
    loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if want_grads else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_grads else None
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h_chunk = hidden[start:end]
        logits = h_chunk @ weight.t()  # [n_chunk, V] in the input dtype, like the reference's F.linear
        loss[start:end] = kernel(logits, targets[start:end], softcap, grad_scale)
        if not want_grads:
            continue
        gh_chunk = grad_hidden[start:end]
        torch.mm(logits, weight, out=gh_chunk)
        if row_scale is not None:
            scale = row_scale[start:end, None]
            gh_chunk.mul_(scale)
            h_chunk = (h_chunk.float() * scale).to(h_chunk.dtype)
        _accumulate(grad_weight, logits, h_chunk)
    if want_grads:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


# --- mean with gradients: computed in the forward ---------------------------------------------------------------

@torch.library.custom_op("tgolf::softcap_ce_mean", mutates_args=())
def _softcap_ce_mean(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                     chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, its grad wrt hidden, its grad wrt weight)."""
    n = hidden.shape[0]
    loss, grad_hidden, grad_weight = _chunked(hidden, weight, targets, softcap, chunk_rows, 1.0 / max(n, 1))
    return loss.mean(), grad_hidden, grad_weight


@_softcap_ce_mean.register_fake
def _(hidden, weight, targets, softcap, chunk_rows):
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), torch.empty_like(weight)


def _mean_setup(ctx, inputs, output) -> None:
    _, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)


def _mean_backward(ctx, grad_loss, _grad_gh, _grad_gw):
    grad_hidden, grad_weight = ctx.saved_tensors
    # a 0-d fp32 factor keeps the bf16 dtype of the gradients (computed in fp32 internally)
    return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


_softcap_ce_mean.register_autograd(_mean_backward, setup_context=_mean_setup)


# --- per-row losses; gradients in the backward ------------------------------------------------------------------

@torch.library.custom_op("tgolf::softcap_ce_rows", mutates_args=())
def _softcap_ce_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                     chunk_rows: int) -> torch.Tensor:
    """Per-row losses [N] fp32."""
    return _chunked(hidden, weight, targets, softcap, chunk_rows, 1.0, want_grads=False)[0]


@_softcap_ce_rows.register_fake
def _(hidden, weight, targets, softcap, chunk_rows):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("tgolf::softcap_ce_backward", mutates_args=())
def _softcap_ce_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         grad_rows: torch.Tensor, softcap: float,
                         chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_rows * loss_rows)`` wrt hidden and weight."""
    _, grad_hidden, grad_weight = _chunked(hidden, weight, targets, softcap, chunk_rows, 1.0,
                                           row_scale=grad_rows.float())
    return grad_hidden, grad_weight


@_softcap_ce_backward.register_fake
def _(hidden, weight, targets, grad_rows, softcap, chunk_rows):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _rows_setup(ctx, inputs, output) -> None:
    hidden, weight, targets, softcap, chunk_rows = inputs
    ctx.save_for_backward(hidden, weight, targets)
    ctx.softcap, ctx.chunk_rows = softcap, chunk_rows


def _rows_backward(ctx, grad_rows):
    hidden, weight, targets = ctx.saved_tensors
    grad_hidden, grad_weight = torch.ops.tgolf.softcap_ce_backward(hidden, weight, targets, grad_rows.contiguous(),
                                                                   ctx.softcap, ctx.chunk_rows)
    return grad_hidden, grad_weight, None, None, None


_softcap_ce_rows.register_autograd(_rows_backward, setup_context=_rows_setup)


# --- public function --------------------------------------------------------------------------------------------

def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, reduction: str,
           chunk_rows: int | None) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none'")
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap):
        raise ValueError(f"softcap={softcap!r}: expected a finite number (<= 0 disables the cap)")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows <= 0):
        raise ValueError(f"chunk_rows={chunk_rows!r}: expected a positive integer or None")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: hidden is [N, D] and "
                         f"weight [V, D], so their second dimensions must match")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets {tuple(getattr(targets, 'shape', ()))} must be 1-D with one entry per row of "
                         f"hidden {tuple(hidden.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():
        low, high = int(targets.min()), int(targets.max())  # no host sync on the CPU; skipped on the GPU
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}) (the vocabulary of weight "
                             f"{tuple(weight.shape)}), got values from {low} to {high}")


def softcap_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          softcap: float = 30.0, reduction: str = "mean", *,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """``CE(softcap·tanh(hidden @ weightᵀ / softcap), targets)`` (fp32), fused in chunks of rows.

    hidden [N, D], weight [V, D] (one dtype; under autocast both run in the autocast dtype), targets [N] integer;
    softcap <= 0 disables the cap. reduction "mean" → 0-d fp32, "none" → [N] fp32. ``chunk_rows`` overrides the
    rows per chunk (default :func:`chunk_rows_for`).
    """
    _check(hidden, weight, targets, softcap, reduction, chunk_rows)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.long().contiguous()
    rows, softcap = chunk_rows or 0, float(softcap)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if reduction == "mean" and needs_grad:
        return torch.ops.tgolf.softcap_ce_mean(hidden, weight, targets, softcap, rows)[0]
    losses = torch.ops.tgolf.softcap_ce_rows(hidden, weight, targets, softcap, rows)
    return losses.mean() if reduction == "mean" else losses


register_op("loss.softcap_cross_entropy", _describe)
