"""Causal linear attention with log-space decay: public op, argument checks, backend choice, autograd.

    o_t = scale · Σ_{s≤t} exp(g_{s+1} + … + g_t) (q_t·k_s) v_s

``linear_attention(q, k, v, decay=..., cu_seqlens=..., initial_state=..., output_state=..., mode=...)``; the
meaning is defined by ``reference.py``. Two forms: "chunk" (training; Triton forward and backward kernels) and
"recurrent" (token by token, for streaming evaluation; its backward is the chunk backward, same meaning).
Feature maps and the key-sum normaliser are applied around the op (``feature_maps.py``).

Backends: Triton on CUDA tensors (and on CPU under TRITON_INTERPRET=1), else the quadratic PyTorch reference.
"""
from __future__ import annotations

import functools
import math
import sys
import types

import torch

from tgolf.backend import Choice, choose, register_op, triton_interpret
from tgolf.ops.linear_attention.reference import linear_attention_quadratic, linear_attention_recurrent

MODES = ("chunk", "recurrent")
MAX_RECURRENT_DK = 256  # the recurrent kernel holds the whole key dimension in one block


def _choose(device: torch.device) -> Choice:
    return choose(device, cuda_name=None, has_triton=True)


register_op("linear_attention.linear_attention", _choose)


# ------------------------------------------------------------------------------------------------ Triton custom ops

def _chunk_table(cu_seqlens: torch.Tensor, chunk: int, max_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(coff int32 [N+1]: first global chunk of each sequence, ctab int32 [max_chunks, 2]: (sequence, chunk)).

    Built on the device with static shapes (no host sync); slots past the real chunk count hold sequence −1.
    """
    cu = cu_seqlens.long()
    counts = (cu[1:] - cu[:-1] + chunk - 1) // chunk
    coff = torch.cat((cu.new_zeros(1), counts.cumsum(0)))
    slots = torch.arange(max_chunks, device=cu.device)
    seq = (torch.searchsorted(coff, slots, right=True) - 1).clamp(0, counts.numel() - 1)
    valid = slots < coff[-1]
    ctab = torch.stack((torch.where(valid, seq, -1), torch.where(valid, slots - coff[seq], 0)), dim=1)
    return coff.to(torch.int32), ctab.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _uniform_tables(num_seqs: int, seq_len: int, chunk: int, device: torch.device):
    """(cu, coff, ctab) for ``num_seqs`` sequences of ``seq_len`` tokens: built once per shape (no per-call launches)."""
    cu = torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * seq_len
    return (cu, *_chunk_table(cu, chunk, num_seqs * math.ceil(seq_len / chunk)))


def _tables(cu_seqlens: torch.Tensor | None, num_seqs: int, total: int, chunk: int, max_chunks: int,
            device: torch.device):
    if cu_seqlens is None:
        return _uniform_tables(num_seqs, total // num_seqs, chunk, device)
    return (cu_seqlens, *_chunk_table(cu_seqlens, chunk, max_chunks))


def _segments(cu_seqlens: torch.Tensor | None, num_seqs: int, total: int, heads: int, dk: int, dv: int, chunk: int,
              max_chunks: int, device: torch.device):
    """(SEG, soff, stab) for the segmented state passes (kern.segment_chunks decides from the shapes), or None.
    A segment is SEG chunks, so its table is the chunk table of chunks SEG times longer."""
    from tgolf.kernels import linear_attention as kern

    seg = kern.segment_chunks(num_seqs, heads, dk, dv, max_chunks)
    if not seg:
        return None
    if cu_seqlens is None:
        return (seg, *_uniform_tables(num_seqs, total // num_seqs, chunk * seg, device)[1:])
    return (seg, *_chunk_table(cu_seqlens, chunk * seg, max_chunks // seg + num_seqs))


@torch.library.custom_op("tgolf::linear_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
         cu_seqlens: torch.Tensor | None, num_seqs: int, initial_state: torch.Tensor | None, scale: float,
         chunk_size: int, max_chunks: int, recurrent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed q [Ttot, H, Dk], k [Ttot, Hkv, Dk], v [Ttot, Hkv, Dv], g [Ttot, H] fp32 → (o, final state fp32).

    Without cu_seqlens the tokens are ``num_seqs`` sequences of equal length.
    """
    from tgolf.kernels import linear_attention as kern

    cu, coff, ctab = _tables(cu_seqlens, num_seqs, q.shape[0], chunk_size, max_chunks, q.device)
    if recurrent:
        return kern.recurrent_forward(q, k, v, g, initial_state, cu, scale)
    segments = _segments(cu_seqlens, num_seqs, q.shape[0], q.shape[1], q.shape[2], v.shape[2], chunk_size,
                         max_chunks, q.device)
    h, ht = kern.chunk_states(k, v, g, initial_state, cu, coff, max_chunks, q.shape[1], chunk_size,
                              triton_interpret(), segments)
    return kern.chunk_output(q, k, v, g, h, cu, ctab, scale, chunk_size, triton_interpret()), ht


@_fwd.register_fake
def _fwd_fake(q, k, v, g, cu_seqlens, num_seqs, initial_state, scale, chunk_size, max_chunks, recurrent):
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype),
            q.new_empty(num_seqs, q.shape[1], q.shape[2], v.shape[2], dtype=torch.float32))


def _suffix_sums(x: torch.Tensor) -> torch.Tensor:
    """S[t, h] = Σ_{r ≥ t} x[r, h] of a [T, H] tensor in float64, as one scan over all H columns laid end to end.

    torch.cumsum along dim 0 of [T, H] runs one thread per column, each walking all T rows in order (ATen's
    outer-dimension scan): at T = 32k that chain takes milliseconds, where a 1-D tensor is scanned in parallel."""
    total, heads = x.shape
    scanned = x.double().T.flip(1).reshape(-1).cumsum(0).view(heads, total)  # column h reversed, after columns < h
    before = torch.cat((scanned.new_zeros(1), scanned[:-1, -1]))  # the totals of the earlier columns
    return (scanned - before[:, None]).flip(1).T


def _reverse_cumsum_per_sequence(dG: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """dg_t = Σ_{r ≥ t, r in t's sequence} dG_r (G_t = g_1 + … + g_t restarts with every sequence), float64 sums."""
    total, heads = dG.shape
    suffix = torch.cat((_suffix_sums(dG), dG.new_zeros(1, heads, dtype=torch.float64)))  # over the packed stream
    seq_end = cu.long()[torch.searchsorted(cu, torch.arange(total, device=dG.device, dtype=cu.dtype), right=True)]
    return (suffix[:total] - suffix[seq_end]).float()


@torch.library.custom_op("tgolf::linear_attention_bwd", mutates_args=())
def _bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
         cu_seqlens: torch.Tensor | None, num_seqs: int, initial_state: torch.Tensor | None,
         final_state: torch.Tensor, do: torch.Tensor, dfinal_state: torch.Tensor | None, scale: float,
         chunk_size: int, max_chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg [Ttot, H] fp32 (empty without g), d initial state (empty without one))."""
    from tgolf.kernels import linear_attention as kern

    interp = triton_interpret()
    heads, hkv = q.shape[1], k.shape[1]
    do = do.contiguous()  # autograd may hand in expanded (stride-0) gradients
    dfinal_state = dfinal_state.contiguous() if dfinal_state is not None else None
    cu, coff, ctab = _tables(cu_seqlens, num_seqs, q.shape[0], chunk_size, max_chunks, q.device)
    segments = _segments(cu_seqlens, num_seqs, q.shape[0], heads, q.shape[2], v.shape[2], chunk_size, max_chunks,
                         q.device)
    h, _ = kern.chunk_states(k, v, g, initial_state, cu, coff, max_chunks, heads, chunk_size, interp, segments)
    dh, dh0 = kern.chunk_state_grads(q, do, g, dfinal_state, cu, coff, max_chunks, scale, chunk_size, interp,
                                     segments)
    dq, dk, dv, dG = kern.chunk_grads(q, k, v, g, h, do, dh, cu, ctab, scale, chunk_size, interp)
    group = heads // hkv
    if group > 1:  # each kv head served `group` query heads: their gradients add
        dk = dk.view(dk.shape[0], hkv, group, -1).sum(2, dtype=torch.float32).to(k.dtype)
        dv = dv.view(dv.shape[0], hkv, group, -1).sum(2, dtype=torch.float32).to(v.dtype)
    if dG is None:
        dg = q.new_empty(0, dtype=torch.float32)
    else:
        if dfinal_state is not None:  # the final state depends on G at each sequence's last token
            lengths = cu[1:] - cu[:-1]
            term = (dfinal_state * final_state).sum((-1, -2)) * (lengths > 0)[:, None]
            dG = dG.index_add(0, (cu[1:].long() - 1).clamp(min=0), term)
        dg = _reverse_cumsum_per_sequence(dG, cu)
    dh0 = dh0 if initial_state is not None else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dg, dh0


@_bwd.register_fake
def _bwd_fake(q, k, v, g, cu_seqlens, num_seqs, initial_state, final_state, do, dfinal_state, scale, chunk_size,
              max_chunks):
    empty = q.new_empty(0, dtype=torch.float32)
    dg = q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32) if g is not None else empty
    dh0 = torch.empty_like(initial_state) if initial_state is not None else empty
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, dh0


def _setup_context(ctx, inputs, output):
    q, k, v, g, cu_seqlens, num_seqs, initial_state, scale, chunk_size, max_chunks, _ = inputs
    ctx.save_for_backward(q, k, v, g, cu_seqlens, initial_state, output[1])
    ctx.args = (scale, chunk_size, max_chunks)
    ctx.num_seqs = num_seqs


def _backward(ctx, do, dfinal_state):
    q, k, v, g, cu_seqlens, initial_state, final_state = ctx.saved_tensors
    dq, dk, dv, dg, dh0 = _bwd(q, k, v, g, cu_seqlens, ctx.num_seqs, initial_state, final_state, do, dfinal_state,
                               *ctx.args)
    return (dq, dk, dv, dg if g is not None else None, None, None, dh0 if initial_state is not None else None,
            None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public op

def _check(q, k, v, decay, cu_seqlens, initial_state, chunk_size, mode) -> int:
    """Validate the arguments (naming the culprit); return the number of independent sequences N."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"linear_attention: q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, seq_len, heads, dk = q.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"linear_attention: q {tuple(q.shape)} is empty (pack empty sequences with cu_seqlens)")
    if k.shape[:2] != (batch, seq_len) or v.shape[:2] != (batch, seq_len):
        raise ValueError(f"linear_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must share q's [B, T] "
                         f"= {(batch, seq_len)}")
    if k.shape[3] != dk:
        raise ValueError(f"linear_attention: k's head dim {k.shape[3]} != q's {dk}")
    if k.shape[2] != v.shape[2] or heads % k.shape[2]:
        raise ValueError(f"linear_attention: k and v need the same number of heads dividing q's {heads}; "
                         f"got k {k.shape[2]}, v {v.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"linear_attention: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("linear_attention: q, k, v must be on one device")
    if decay is not None and tuple(decay.shape) not in ((heads,), (batch, seq_len, heads)):
        raise ValueError(f"linear_attention: decay must be [H]={heads} or [B, T, H]={(batch, seq_len, heads)}; "
                         f"got {tuple(decay.shape)}")
    num_seqs = batch
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
            raise ValueError(f"linear_attention: cu_seqlens must be int32 [N+1] with N ≥ 1; got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if batch != 1:
            raise ValueError(f"linear_attention: cu_seqlens needs B == 1 (packed sequences); got B = {batch}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"linear_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
        num_seqs = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (num_seqs, heads, dk, v.shape[3]):
        raise ValueError(f"linear_attention: initial_state must be [N, H, Dk, Dv] = "
                         f"{(num_seqs, heads, dk, v.shape[3])}; got {tuple(initial_state.shape)}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"linear_attention: chunk_size must be a power of two ≥ 16; got {chunk_size}")
    if mode not in MODES:
        raise ValueError(f"linear_attention: mode must be one of {MODES}; got {mode!r}")
    if mode == "recurrent" and dk > MAX_RECURRENT_DK:
        raise ValueError(f"linear_attention: mode='recurrent' supports head dim ≤ {MAX_RECURRENT_DK}; got {dk}")
    return num_seqs


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                     output_state: bool = False, scale: float = 1.0, chunk_size: int = 64,
                     mode: str = "chunk") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention: q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] (Hkv divides H: GQA).

    decay: log decay g ≤ 0 (not checked: no host sync), None, per head [H] or per token [B, T, H]; any dtype,
        used in float32; differentiable.
    cu_seqlens: int32 [N+1] offsets of N packed sequences (flash-attn varlen, B must be 1); the state restarts
        at every boundary (from ``initial_state[n]`` when given).
    initial_state: [N, H, Dk, Dv] (N = B without cu_seqlens), differentiable; output_state=True also returns
        the final state [N, H, Dk, Dv] float32.
    mode: "chunk" (training) or "recurrent" (token-by-token streaming); same meaning and gradients.
    Returns o [B, T, H, Dv] in q's dtype (and the state).
    """
    num_seqs = _check(q, k, v, decay, cu_seqlens, initial_state, chunk_size, mode)
    batch, seq_len, heads, _ = q.shape
    g = None
    if decay is not None:
        g = decay.float()
        if g.dim() == 1:
            g = g[None, None, :].expand(batch, seq_len, heads)
    backend = _choose(q.device).backend
    if backend == "reference":
        # One meaning, so the (vectorised) quadratic form serves both modes here.
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        o, state = linear_attention_quadratic(q, k, v, decay=g, cu_seqlens=cu_seqlens, initial_state=initial_state,
                                              scale=scale, dtype=compute)
        return (o, state) if output_state else o
    if cu_seqlens is None:
        max_chunks = batch * math.ceil(seq_len / chunk_size)
    else:
        cu_seqlens = cu_seqlens.contiguous()
        max_chunks = (batch * seq_len) // chunk_size + num_seqs  # bound: each sequence adds ≤ 1 partial chunk
    total = batch * seq_len
    o, state = _fwd(q.reshape(total, heads, -1).contiguous(), k.reshape(total, k.shape[2], -1).contiguous(),
                    v.reshape(total, v.shape[2], -1).contiguous(),
                    g.reshape(total, heads).contiguous() if g is not None else None, cu_seqlens, num_seqs,
                    initial_state.float().contiguous() if initial_state is not None else None,
                    float(scale), int(chunk_size), int(max(max_chunks, 1)), mode == "recurrent")
    o = o.view(batch, seq_len, heads, -1)
    return (o, state) if output_state else o


__all__ = ["linear_attention", "linear_attention_quadratic", "linear_attention_recurrent", "MODES"]


class _CallablePackage(types.ModuleType):
    """``tgolf.ops.linear_attention`` is both this package and the op: once the package is imported, Python binds
    the name on ``tgolf.ops`` to the package, so calling the package calls the op."""

    def __call__(self, *args, **kwargs):
        return linear_attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
