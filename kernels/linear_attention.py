"""Triton kernels for causal linear attention with log-space decay (chunked and recurrent forms).

Meaning (see tgolf/ops/linear_attention/reference.py): o_t = scale · Σ_{s≤t} exp(g_{s+1}+…+g_t) (q_t·k_s) v_s,
with a state S carried from chunk to chunk. Every tensor arrives packed: q [Ttot, H, Dk], k [Ttot, Hkv, Dk],
v [Ttot, Hkv, Dv], g [Ttot, H] float32 log decay; independent sequences are delimited by ``cu`` (int32 [N+1]) and
chunk ``c`` of sequence ``n`` has the global index ``coff[n] + c`` (``coff``, int32 [N+1], counts chunks).

Chunked algorithm, for one chunk with chunk-local cumulative log decay b_t (b at the chunk's last token: b_L):
    o = scale · (exp(b) ⊙ q) S_in + scale · ((q kᵀ) ⊙ exp(b_t − b_s)[s≤t]) v
    S_out = exp(b_L) S_in + (exp(b_L − b) ⊙ k)ᵀ v
Every exponent is ≤ 0, so nothing overflows however strong the decay. Launches:
    forward:  state pass (sequential over chunks, parallel over sequences × heads × Dk/Dv blocks; long sequences
              in few programs: over segments, then a scan over each sequence's segments, then over segments again)
              + output pass (parallel over chunks × heads × Dv blocks)
    backward: state pass again (recomputes the chunk-entry states instead of keeping them)
              + reverse state-gradient pass (the same kernel) + one fused dq/dk/dv/dG pass parallel over
              chunks × heads.
The per-token decay gradient comes from dG_t = q_t·dq_t − k_t·dk_t (gradient w.r.t. the cumulative log decay),
whose reverse cumulative sum the op takes in PyTorch.

Dots run in the inputs' dtype with fp32 accumulation; ``DOT_DTYPE=float32`` with ``PREC="ieee"`` gives exact fp32
dots (fp32 inputs, and the CPU interpreter, where bf16 tl.dot is wrong: triton issue 11584).
Block sizes are fixed by the launch helpers (no autotuning): chunk BT, Dk block BK ≤ 128, Dv block BV ≤ 64.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _mm(a, b, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PREC)


@triton.jit
def _chunk_decay(g_ptr, offs_t, mask_t, i_h, H):
    """Chunk-local cumulative log decay b [BT] and its last value b_L (padding rows add nothing)."""
    gc = tl.load(g_ptr + offs_t * H + i_h, mask=mask_t, other=0.0).to(tl.float32)
    return tl.cumsum(gc, 0), tl.sum(gc, 0)


@triton.jit
def _chunk_ids(ctab_ptr, cu_ptr, i_c, BT: tl.constexpr):
    """(sequence index, first token, end token) of global chunk i_c; sequence −1 marks an unused slot."""
    i_n = tl.load(ctab_ptr + 2 * i_c)
    c = tl.load(ctab_ptr + 2 * i_c + 1)
    bos = tl.load(cu_ptr + tl.maximum(i_n, 0))
    eos = tl.load(cu_ptr + tl.maximum(i_n, 0) + 1)
    return i_n, bos + c * BT, eos


@triton.jit
def _chunk_rows(a_ptr, b_ptr, offs_t, mask_t, head, HEADS, offs_k, offs_v, DK, DV):
    """A state pass's operands for one chunk: a [T, HEADS, DK] at tokens offs_t as a [BK, BT] tile (transposed)
    and b [T, HEADS, DV] as a [BT, BV] tile, both for `head`; padding reads zeros."""
    at = tl.load(a_ptr + offs_t[None, :].to(tl.int64) * HEADS * DK + head * DK + offs_k[:, None],
                 mask=mask_t[None, :] & (offs_k[:, None] < DK), other=0.0)
    bb = tl.load(b_ptr + offs_t[:, None].to(tl.int64) * HEADS * DV + head * DV + offs_v[None, :],
                 mask=mask_t[:, None] & (offs_v[None, :] < DV), other=0.0)
    return at, bb


@triton.jit
def _state_start(init_ptr, unit, i_h, i_k, i_v, H, DK, DV, BK: tl.constexpr, BV: tl.constexpr,
                 HAS_INIT: tl.constexpr):
    """A state tile's mask and offsets within one [H, DK, DV] state, and its start: init_ptr[unit] (HAS_INIT) or 0."""
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_kv = (offs_k[:, None] < DK) & (offs_v[None, :] < DV)
    state_offs = (i_h * DK + offs_k[:, None]) * DV + offs_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        state += tl.load(init_ptr + unit.to(tl.int64) * H * DK * DV + state_offs, mask=mask_kv,
                         other=0.0).to(tl.float32)
    return offs_k, offs_v, mask_kv, state_offs, state


@triton.jit
def chunk_state_kernel(a_ptr, b_ptr, g_ptr, init_ptr, h_ptr, out_ptr, gsum_ptr, cu_ptr, coff_ptr, stab_ptr, scale,
                       H, A_HEADS, DK, DV,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SEG: tl.constexpr,
                       REVERSE: tl.constexpr, HAS_G: tl.constexpr, HAS_INIT: tl.constexpr, WRITE_H: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """One [BK, BV] tile of the chunk-state recurrence S ← exp(b_L) S + scale · (w ⊙ a)ᵀ b, walked over the
    chunks of one sequence (SEG = 0) or of one segment of ≤ SEG chunks (segment i: sequence stab[i, 0], chunks from
    stab[i, 1] · SEG), starting from init_ptr[unit] (HAS_INIT) or zeros, unit = the sequence or the segment:

    * forward (REVERSE=False): a = k, b = v (kv heads), w = exp(b_L − b), scale 1, chunks in order;
    * backward (REVERSE=True): a = q, b = do (query heads), w = exp(b), chunks last to first.

    WRITE_H stores the state met before each chunk at h[coff[n] + c] (forward: entering chunk c; backward: the
    gradient w.r.t. the state leaving it). A whole walk, and a segment's first walk (from zero, without WRITE_H),
    store the final state at out_ptr[unit]; that first walk, with HAS_G, also the segment's total log decay Σ b_L
    at gsum_ptr[segment, head] (segment_scan_kernel chains them).
    """
    i_row, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    unit, i_h = i_row // H, i_row % H
    i_ah = i_h // (H // A_HEADS)
    if SEG == 0:
        i_n = unit
        c_first = 0
    else:
        i_n = tl.load(stab_ptr + 2 * unit)
        c_first = tl.load(stab_ptr + 2 * unit + 1) * SEG
    if i_n < 0:  # a segment slot past the real ones holds sequence −1
        return
    bos = tl.load(cu_ptr + i_n)
    eos = tl.load(cu_ptr + i_n + 1)
    c0 = tl.load(coff_ptr + i_n)
    count = tl.cdiv(eos - bos, BT) - c_first
    if SEG > 0:
        count = tl.minimum(count, SEG)
    offs_k, offs_v, mask_kv, state_offs, state = _state_start(init_ptr, unit, i_h, i_k, i_v, H, DK, DV, BK, BV,
                                                              HAS_INIT)
    gsum = 0.0
    for i in range(0, count):
        if REVERSE:
            c = c_first + count - 1 - i
        else:
            c = c_first + i
        if WRITE_H:
            tl.store(h_ptr + (c0 + c).to(tl.int64) * H * DK * DV + state_offs, state, mask=mask_kv)
        offs_t = bos + c * BT + tl.arange(0, BT)
        mask_t = offs_t < eos
        at, bb = _chunk_rows(a_ptr, b_ptr, offs_t, mask_t, i_ah, A_HEADS, offs_k, offs_v, DK, DV)
        if HAS_G:
            b, b_last = _chunk_decay(g_ptr, offs_t, mask_t, i_h, H)
            state = state * tl.exp(b_last)
            if REVERSE:
                at = at.to(tl.float32) * tl.exp(b)[None, :]
            else:
                at = at.to(tl.float32) * tl.exp(b_last - b)[None, :]
            gsum += b_last
        state += _mm(at, bb, DOT_DTYPE, PREC) * scale
    if SEG == 0 or not WRITE_H:  # a segment's second walk (WRITE_H) already has its end state and decay
        tl.store(out_ptr + unit.to(tl.int64) * H * DK * DV + state_offs, state, mask=mask_kv)
        if SEG > 0 and HAS_G and i_k == 0 and i_v == 0:
            tl.store(gsum_ptr + unit * H + i_h, gsum)


@triton.jit
def segment_scan_kernel(local_ptr, gsum_ptr, init_ptr, entry_ptr, out_ptr, soff_ptr,
                        H, DK, DV, BK: tl.constexpr, BV: tl.constexpr,
                        REVERSE: tl.constexpr, HAS_G: tl.constexpr, HAS_INIT: tl.constexpr):
    """Chains one sequence's segments (soff[n] .. soff[n+1]), in pass order (REVERSE: last to first): each
    segment's state from zero (local) and total log decay (gsum) give entry[j], the true state the segment starts
    from, and out[n], the state after the sequence's last segment. One program per (sequence, head, tile)."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    s_first = tl.load(soff_ptr + i_n)
    s_count = tl.load(soff_ptr + i_n + 1) - s_first
    _, _, mask_kv, state_offs, state = _state_start(init_ptr, i_n, i_h, i_k, i_v, H, DK, DV, BK, BV, HAS_INIT)
    for i in range(0, s_count):
        if REVERSE:
            j = s_first + s_count - 1 - i
        else:
            j = s_first + i
        tl.store(entry_ptr + j.to(tl.int64) * H * DK * DV + state_offs, state, mask=mask_kv)
        if HAS_G:
            state = state * tl.exp(tl.load(gsum_ptr + j * H + i_h))
        state += tl.load(local_ptr + j.to(tl.int64) * H * DK * DV + state_offs, mask=mask_kv, other=0.0)
    tl.store(out_ptr + i_n.to(tl.int64) * H * DK * DV + state_offs, state, mask=mask_kv)


@triton.jit
def chunk_out_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, o_ptr, cu_ptr, ctab_ptr, scale,
                         H, HKV, DK, DV,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                         HAS_G: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """o for one (Dv block, chunk, head): inter-chunk part from h plus the masked intra-chunk quadratic part."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, t0, eos = _chunk_ids(ctab_ptr, cu_ptr, i_c, BT)
    if i_n < 0:
        return
    i_hkv = i_h // (H // HKV)
    offs_t = t0 + tl.arange(0, BT)
    mask_t = offs_t < eos
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, NK):
        offs_k = i_k * BK + tl.arange(0, BK)
        mask_k = offs_k < DK
        qq = tl.load(q_ptr + offs_t[:, None].to(tl.int64) * H * DK + i_h * DK + offs_k[None, :],
                     mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        kt = tl.load(k_ptr + offs_t[None, :].to(tl.int64) * HKV * DK + i_hkv * DK + offs_k[:, None],
                     mask=mask_t[None, :] & mask_k[:, None], other=0.0)
        hh = tl.load(h_ptr + i_c.to(tl.int64) * H * DK * DV + (i_h * DK + offs_k[:, None]) * DV + offs_v[None, :],
                     mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        acc += _mm(qq, hh, DOT_DTYPE, PREC)
        scores += _mm(qq, kt, DOT_DTYPE, PREC)
    rows = tl.arange(0, BT)
    causal = (rows[:, None] >= rows[None, :]) & mask_t[None, :]
    if HAS_G:
        b, b_last = _chunk_decay(g_ptr, offs_t, mask_t, i_h, H)
        acc = acc * tl.exp(b)[:, None]
        scores = scores * tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    scores = tl.where(causal, scores, 0.0)
    vv = tl.load(v_ptr + offs_t[:, None].to(tl.int64) * HKV * DV + i_hkv * DV + offs_v[None, :],
                 mask=mask_t[:, None] & mask_v[None, :], other=0.0)
    acc += _mm(scores, vv, DOT_DTYPE, PREC)
    tl.store(o_ptr + offs_t[:, None].to(tl.int64) * H * DV + i_h * DV + offs_v[None, :],
             (acc * scale).to(o_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])


@triton.jit
def chunk_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, do_ptr, dh_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
                     cu_ptr, ctab_ptr, scale,
                     H, HKV, DK, DV,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
                     HAS_G: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """dq, dk, dv (per query head) and dG_t = q_t·dq_t − k_t·dk_t for one (chunk, head)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, t0, eos = _chunk_ids(ctab_ptr, cu_ptr, i_c, BT)
    if i_n < 0:
        return
    i_hkv = i_h // (H // HKV)
    offs_t = t0 + tl.arange(0, BT)
    mask_t = offs_t < eos
    rows = tl.arange(0, BT)
    causal = (rows[:, None] >= rows[None, :]) & mask_t[None, :] & mask_t[:, None]
    tok_q = offs_t.to(tl.int64) * H
    tok_kv = offs_t.to(tl.int64) * HKV
    state_base = i_c.to(tl.int64) * H * DK * DV + i_h * DK * DV
    scores = tl.zeros([BT, BT], dtype=tl.float32)  # A_ts = scale · q_t·k_s · decay
    dscores = tl.zeros([BT, BT], dtype=tl.float32)  # dA_ts = scale · do_t·v_s · decay
    for i_k in range(0, NK):
        offs_k = i_k * BK + tl.arange(0, BK)
        mk = mask_t[:, None] & (offs_k[None, :] < DK)
        qq = tl.load(q_ptr + tok_q[:, None] * DK + i_h * DK + offs_k[None, :], mask=mk, other=0.0)
        kk = tl.load(k_ptr + tok_kv[:, None] * DK + i_hkv * DK + offs_k[None, :], mask=mk, other=0.0)
        scores += _mm(qq, tl.trans(kk), DOT_DTYPE, PREC)
    for i_v in range(0, NV):
        offs_v = i_v * BV + tl.arange(0, BV)
        mv = mask_t[:, None] & (offs_v[None, :] < DV)
        dd = tl.load(do_ptr + tok_q[:, None] * DV + i_h * DV + offs_v[None, :], mask=mv, other=0.0)
        vv = tl.load(v_ptr + tok_kv[:, None] * DV + i_hkv * DV + offs_v[None, :], mask=mv, other=0.0)
        dscores += _mm(dd, tl.trans(vv), DOT_DTYPE, PREC)
    if HAS_G:
        b, b_last = _chunk_decay(g_ptr, offs_t, mask_t, i_h, H)
        decay = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        scores = scores * decay
        dscores = dscores * decay
        q_decay = tl.exp(b)
        k_decay = tl.exp(b_last - b)
    else:
        q_decay = tl.full([BT], 1.0, tl.float32)
        k_decay = tl.full([BT], 1.0, tl.float32)
    scores = tl.where(causal, scores * scale, 0.0)
    dscores = tl.where(causal, dscores * scale, 0.0)
    for i_v in range(0, NV):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < DV
        mv = mask_t[:, None] & mask_v[None, :]
        dd = tl.load(do_ptr + tok_q[:, None] * DV + i_h * DV + offs_v[None, :], mask=mv, other=0.0)
        dv = _mm(tl.trans(scores), dd, DOT_DTYPE, PREC)
        inter = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(0, NK):
            offs_k = i_k * BK + tl.arange(0, BK)
            mask_k = offs_k < DK
            kk = tl.load(k_ptr + tok_kv[:, None] * DK + i_hkv * DK + offs_k[None, :],
                         mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            dh = tl.load(dh_ptr + state_base + offs_k[:, None] * DV + offs_v[None, :],
                         mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            inter += _mm(kk, dh, DOT_DTYPE, PREC)
        dv += inter * k_decay[:, None]
        tl.store(dv_ptr + tok_q[:, None] * DV + i_h * DV + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mv)
    dgate = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, NK):
        offs_k = i_k * BK + tl.arange(0, BK)
        mask_k = offs_k < DK
        mk = mask_t[:, None] & mask_k[None, :]
        qq = tl.load(q_ptr + tok_q[:, None] * DK + i_h * DK + offs_k[None, :], mask=mk, other=0.0)
        kk = tl.load(k_ptr + tok_kv[:, None] * DK + i_hkv * DK + offs_k[None, :], mask=mk, other=0.0)
        dq = _mm(dscores, kk, DOT_DTYPE, PREC)
        dk = _mm(tl.trans(dscores), qq, DOT_DTYPE, PREC)
        inter_q = tl.zeros([BT, BK], dtype=tl.float32)
        inter_k = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, NV):
            offs_v = i_v * BV + tl.arange(0, BV)
            mask_v = offs_v < DV
            mv = mask_t[:, None] & mask_v[None, :]
            dd = tl.load(do_ptr + tok_q[:, None] * DV + i_h * DV + offs_v[None, :], mask=mv, other=0.0)
            vv = tl.load(v_ptr + tok_kv[:, None] * DV + i_hkv * DV + offs_v[None, :], mask=mv, other=0.0)
            mhv = mask_k[:, None] & mask_v[None, :]
            hh = tl.load(h_ptr + state_base + offs_k[:, None] * DV + offs_v[None, :], mask=mhv, other=0.0)
            dh = tl.load(dh_ptr + state_base + offs_k[:, None] * DV + offs_v[None, :], mask=mhv, other=0.0)
            inter_q += _mm(dd, tl.trans(hh), DOT_DTYPE, PREC)
            inter_k += _mm(vv, tl.trans(dh), DOT_DTYPE, PREC)
        dq += inter_q * (q_decay * scale)[:, None]
        dk += inter_k * k_decay[:, None]
        tl.store(dq_ptr + tok_q[:, None] * DK + i_h * DK + offs_k[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mk)
        tl.store(dk_ptr + tok_q[:, None] * DK + i_h * DK + offs_k[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mk)
        if HAS_G:
            dgate += tl.sum(qq.to(tl.float32) * dq - kk.to(tl.float32) * dk, 1)
    if HAS_G:
        tl.store(dg_ptr + offs_t * H + i_h, dgate, mask=mask_t)


@triton.jit
def recurrent_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, cu_ptr, scale,
                         H, HKV, DK, DV,
                         BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, HAS_H0: tl.constexpr):
    """Token by token (streaming): S ← exp(g_t) S + k_t v_tᵀ, o_t = scale · q_t S; one program per (Dv block, seq, head)."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hkv = i_h // (H // HKV)
    bos = tl.load(cu_ptr + i_n)
    eos = tl.load(cu_ptr + i_n + 1)
    offs_k, offs_v, mask_kv, state_offs, state = _state_start(h0_ptr, i_n, i_h, 0, i_v, H, DK, DV, BK, BV, HAS_H0)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    for i in range(0, eos - bos):
        t64 = (bos + i).to(tl.int64)
        kk = tl.load(k_ptr + t64 * HKV * DK + i_hkv * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + t64 * HKV * DV + i_hkv * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        qq = tl.load(q_ptr + t64 * H * DK + i_h * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        if HAS_G:
            state = state * tl.exp(tl.load(g_ptr + t64 * H + i_h).to(tl.float32))
        state += kk[:, None] * vv[None, :]
        out = tl.sum(qq[:, None] * state, 0) * scale
        tl.store(o_ptr + t64 * H * DV + i_h * DV + offs_v, out.to(o_ptr.dtype.element_ty), mask=mask_v)
    tl.store(ht_ptr + i_n * H * DK * DV + state_offs, state, mask=mask_kv)


# ------------------------------------------------------------------------------------------------ launch helpers

# Largest Dk / Dv tiles (tests lower them to exercise the multi-block paths with small head dims).
MAX_BLOCK_K = 128
MAX_BLOCK_V = 64
# chunk_bwd_kernel keeps more [BK, BV] tiles live per step (h, dh and their pipelined loads); at BK = 128 it needs
# 232 KiB of shared memory (tests/_sm90_launches.py reports it), over H100's 227 KiB per block, and spills registers.
# With several [BK, BV] blocks (head dim 128) it runs 8 warps: at 4 the 255 registers per thread spill.
MAX_BLOCK_K_BACKWARD = 64
# The state passes walk the chunks one after another; with fewer (sequence, head, Dk block) rows than this they
# also split Dv finer (32), to keep more SMs busy (H100: 132). A fixed rule, no autotuning (GPU tuning pending).
SEQUENTIAL_ROWS_FOR_WIDE_TILES = 256
# segment_chunks' cost model, not yet timed on a GPU: programs that progress at once (H100: 132 SMs × 4 state-pass
# programs), a scan step's cost against a chunk step's (a tile load and store, no dot), the saving that pays for
# two more launches and the second read, and the segment lengths tried.
CONCURRENT_PROGRAMS = 528
SCAN_STEP_COST = 0.66
SEGMENT_GAIN = 0.7
SEGMENT_CHOICES = (4, 8, 16, 32, 64)
MIN_SEGMENTED_CHUNKS = 32  # shorter walks (2k tokens at chunks of 64) save less than two launches cost
# True forces one walk per sequence whatever the shape: the benchmark's anchor for what the segments save.
WHOLE_WALK = False
# Grids put what grows with the data (chunks; sequences × heads) on x: CUDA allows 2³¹−1 blocks along x but only
# 65,535 along y and z (e.g. 65,536 chunks of 64 = 4.2M tokens in one call).


def _blocks(dk: int, dv: int, sequential_rows: int | None = None, max_block_k: int | None = None
            ) -> tuple[int, int, int, int]:
    """(BK, BV, NK, NV); ``sequential_rows`` (state passes only) = sequences × heads; ``max_block_k`` lowers
    MAX_BLOCK_K."""
    bk = min(max(triton.next_power_of_2(dk), 16), MAX_BLOCK_K, max_block_k or MAX_BLOCK_K)
    cap = MAX_BLOCK_V
    if sequential_rows is not None and sequential_rows * triton.cdiv(dk, bk) < SEQUENTIAL_ROWS_FOR_WIDE_TILES:
        cap = min(cap, 32)
    bv = min(max(triton.next_power_of_2(dv), 16), cap)
    return bk, bv, triton.cdiv(dk, bk), triton.cdiv(dv, bv)


def _dot_config(dtype: torch.dtype, interpret: bool) -> tuple:
    if interpret or dtype == torch.float32:
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), None  # precision applies to fp32 only


# Tests set this to fill every output (and scratch state buffer) with NaN before the kernels run, proving that
# the kernels write every element that is read.
POISON_OUTPUTS = False


def _empty(like: torch.Tensor, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return like.new_full(shape, float("nan"), dtype=dtype)
    return like.new_empty(shape, dtype=dtype)


def _dummy(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(1, dtype=torch.float32)


def segment_chunks(num_seqs: int, heads: int, dk: int, dv: int, num_chunks: int) -> int:
    """Segment length (in chunks) for the state passes of this shape; 0 = one sequential walk per sequence.

    A state pass walks its chunks one after another, parallel only over sequences × heads × Dk/Dv tiles: with few
    programs its time is the chain's length times one step's latency (the H100 forward fell to 0.69× fla's at
    T = 32k, B = 2: 32 programs walking 512 chunks). Segments of S chunks cost two walks of S steps, in as many
    waves as their programs need, plus a scan over the segments (see _state_pass), for one more read of the chunk
    inputs. The cost model below (unit: one chunk step of one program) picks S, and segments only where they save
    a good share (SEGMENT_GAIN): long sequences in small batches."""
    if WHOLE_WALK:
        return 0
    bk, bv, nk, nv = _blocks(dk, dv, num_seqs * heads)
    programs = num_seqs * heads * nk * nv
    chunks = num_chunks // max(num_seqs, 1)  # per sequence, on average

    def waves(units: int) -> int:
        return math.ceil(units / CONCURRENT_PROGRAMS)

    whole = chunks * waves(programs)
    if chunks < MIN_SEGMENTED_CHUNKS:
        return 0
    best, best_cost = 0, SEGMENT_GAIN * whole
    for seg in SEGMENT_CHOICES:
        if 2 * seg > chunks:
            break
        segments = math.ceil(chunks / seg)
        cost = 2 * seg * waves(programs * segments) + SCAN_STEP_COST * segments * waves(programs)
        if cost < best_cost:
            best, best_cost = seg, cost
    return best


def _state_pass(a, b, g, init, cu, coff, segments, num_chunks: int, heads: int, chunk: int, scale: float,
                reverse: bool, interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [num_chunks, H, Dk, Dv] fp32: the state met before each chunk, final [N, H, Dk, Dv] fp32) of the
    recurrence of chunk_state_kernel (forward: a, b = k, v; backward: q, do with ``reverse``).

    ``segments`` = (SEG, soff, stab) from segment_chunks and the op's tables, or None. With segments: (1) every
    segment walked from a zero state (parallel over segments), keeping its end state and total log decay; (2)
    segment_scan_kernel chains each sequence's segments into their true entry states and the final state; (3)
    every segment walked again from its entry state, writing h. Unused slots (sequence −1) are skipped."""
    n, dk, dv = cu.numel() - 1, a.shape[2], b.shape[2]
    bk, bv, nk, nv = _blocks(dk, dv, n * heads)
    dot_dtype, prec = _dot_config(a.dtype, interpret)
    has_g = g is not None
    h = _empty(a, num_chunks, heads, dk, dv, dtype=torch.float32)  # unused slots are never read
    final = _empty(a, n, heads, dk, dv, dtype=torch.float32)

    def walk(units: int, start, h_out, end_out, gsum, stab, seg: int, write_h: bool) -> None:
        chunk_state_kernel[(units * heads, nk, nv)](
            a, b, g if has_g else _dummy(a), start if start is not None else _dummy(a), h_out, end_out, gsum, cu,
            coff, stab, scale, heads, a.shape[1], dk, dv, BT=chunk, BK=bk, BV=bv, SEG=seg, REVERSE=reverse,
            HAS_G=has_g, HAS_INIT=start is not None, WRITE_H=write_h, DOT_DTYPE=dot_dtype, PREC=prec)

    if segments is None:
        walk(n, init, h, final, _dummy(a), coff, 0, True)
        return h, final
    seg, soff, stab = segments
    slots = stab.shape[0]
    local = _empty(a, slots, heads, dk, dv, dtype=torch.float32)
    entry = _empty(a, slots, heads, dk, dv, dtype=torch.float32)
    gsum = _empty(a, slots, heads, dtype=torch.float32) if has_g else _dummy(a)
    walk(slots, None, _dummy(a), local, gsum, stab, seg, False)
    segment_scan_kernel[(n * heads, nk, nv)](
        local, gsum, init if init is not None else _dummy(a), entry, final, soff, heads, dk, dv, BK=bk, BV=bv,
        REVERSE=reverse, HAS_G=has_g, HAS_INIT=init is not None)
    walk(slots, entry, h, _dummy(a), gsum, stab, seg, True)
    return h, final


def chunk_states(k, v, g, h0, cu, coff, num_chunks: int, num_heads: int, chunk: int, interpret: bool,
                 segments=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [num_chunks, H, Dk, Dv] fp32: state entering each chunk, ht [N, H, Dk, Dv] fp32)."""
    return _state_pass(k, v, g, h0, cu, coff, segments, num_chunks, num_heads, chunk, 1.0, False, interpret)


def chunk_output(q, k, v, g, h, cu, ctab, scale: float, chunk: int, interpret: bool) -> torch.Tensor:
    heads, hkv, dk, dv = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    bk, bv, nk, nv = _blocks(dk, dv)
    dot_dtype, prec = _dot_config(q.dtype, interpret)
    o = _empty(q, q.shape[0], heads, dv, dtype=v.dtype)
    chunk_out_fwd_kernel[(ctab.shape[0], nv, heads)](
        q, k, v, g if g is not None else _dummy(q), h, o, cu, ctab, scale, heads, hkv, dk, dv,
        BT=chunk, BK=bk, BV=bv, NK=nk, HAS_G=g is not None, DOT_DTYPE=dot_dtype, PREC=prec)
    return o


def chunk_state_grads(q, do, g, dht, cu, coff, num_chunks: int, scale: float, chunk: int, interpret: bool,
                      segments=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh [num_chunks, H, Dk, Dv] fp32: gradient w.r.t. each chunk's outgoing state, dh0 [N, H, Dk, Dv] fp32)."""
    return _state_pass(q, do, g, dht, cu, coff, segments, num_chunks, q.shape[1], chunk, scale, True, interpret)


def chunk_grads(q, k, v, g, h, do, dh, cu, ctab, scale: float, chunk: int, interpret: bool):
    """(dq [Ttot, H, Dk], dk and dv per query head [Ttot, H, D], dG [Ttot, H] fp32 or None)."""
    heads, hkv, dk, dv = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    bk, bv, nk, nv = _blocks(dk, dv, max_block_k=MAX_BLOCK_K_BACKWARD)
    dot_dtype, prec = _dot_config(q.dtype, interpret)
    total = q.shape[0]
    dq = _empty(q, *q.shape, dtype=q.dtype)
    dkk = _empty(q, total, heads, dk, dtype=k.dtype)
    dvv = _empty(q, total, heads, dv, dtype=v.dtype)
    dg = _empty(q, total, heads, dtype=torch.float32) if g is not None else None
    chunk_bwd_kernel[(ctab.shape[0], heads)](
        q, k, v, g if g is not None else _dummy(q), h, do, dh, dq, dkk, dvv, dg if dg is not None else _dummy(q),
        cu, ctab, scale, heads, hkv, dk, dv, BT=chunk, BK=bk, BV=bv, NK=nk, NV=nv, HAS_G=g is not None,
        DOT_DTYPE=dot_dtype, PREC=prec, num_warps=4 if nk * nv == 1 else 8)
    return dq, dkk, dvv, dg


def recurrent_forward(q, k, v, g, h0, cu, scale: float):
    """(o [Ttot, H, Dv], ht [N, H, Dk, Dv] fp32), token by token; Dk must fit one block."""
    heads, hkv, dk, dv = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    n = cu.numel() - 1
    bk = max(triton.next_power_of_2(dk), 16)
    bv = min(max(triton.next_power_of_2(dv), 16), MAX_BLOCK_V)
    o = _empty(q, q.shape[0], heads, dv, dtype=v.dtype)
    ht = _empty(q, n, heads, dk, dv, dtype=torch.float32)
    recurrent_fwd_kernel[(n * heads, triton.cdiv(dv, bv))](
        q, k, v, g if g is not None else _dummy(q), h0 if h0 is not None else _dummy(q), o, ht, cu, scale,
        heads, hkv, dk, dv, BK=bk, BV=bv, HAS_G=g is not None, HAS_H0=h0 is not None)
    return o, ht
