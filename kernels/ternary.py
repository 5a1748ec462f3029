"""Triton kernels for ternary linear layers (BitNet b1.58): weight quantization, GEMMs that read ternary codes,
int8 activation quantization and the int8 × int8 → int32 GEMM.

The numerics copy tgolf/ops/ternary/reference.py operation for operation (float64 sums and products where the
reference uses them) so that codes, scales and int8 results match it bit for bit. Block sizes are fixed per shape
class (no autotuning inside a training step); the GPU values are first guesses that still need tuning on an H100.
Launch helpers take an optional ``out`` so tests can poison outputs with NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgolf.kernels.common import k_step_rows, output_tile

# ------------------------------------------------------------------------------------------------ weight quantization

@triton.jit
def _absmean_scales_kernel(w_ptr, scales_ptr, N, K, G, GS, stride_w, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (BLOCK_N rows, group): scale = fp16(fp32(Σ|w| in float64 / count)), in fp16's range."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    start = grp * GS
    end = tl.minimum(start + GS, K)
    acc = tl.zeros([BLOCK_N, BLOCK], dtype=tl.float64)
    for k0 in range(start, end, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs[None, :],
                    mask=(rows[:, None] < N) & (offs[None, :] < end), other=0.0)
        acc += tl.abs(w.to(tl.float64))
    mean = (tl.sum(acc, axis=1) / (end - start).to(tl.float64)).to(tl.float32)
    mean = tl.minimum(tl.maximum(mean, 5.9604644775390625e-08), 65504.0)  # [2^-24, fp16 max]
    tl.store(scales_ptr + rows * G + grp, mean.to(tl.float16).to(tl.float32), mask=rows < N)


@triton.jit
def _ternary_codes_kernel(w_ptr, scales_ptr, codes_ptr, packed_ptr, N, K, KB, G, GS, stride_w,
                          BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Codes int8 and 2-bit packed bytes of a [BLOCK_N rows, BLOCK_B bytes = 4·BLOCK_B columns] tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.arange(0, 4)
    r3 = rows[:, None, None]
    k = b[None, :, None] * 4 + j[None, None, :]
    kmask = (r3 < N) & (k < K)
    w = tl.load(w_ptr + r3 * stride_w + k, mask=kmask, other=0.0).to(tl.float32)
    half = 0.5 * tl.load(scales_ptr + r3 * G + k // GS, mask=kmask, other=1.0)
    code = tl.where(w > half, 1, tl.where(w < -half, -1, 0))
    tl.store(codes_ptr + r3 * K + k, code.to(tl.int8), mask=kmask)
    byte = tl.sum((code + 1) << (2 * j[None, None, :]), axis=2)  # padding columns: w = 0 → zero-code 1
    tl.store(packed_ptr + rows[:, None] * KB + b[None, :], byte.to(tl.uint8),
             mask=(rows[:, None] < N) & (b[None, :] < KB))


def quantize_weight(w: torch.Tensor, group_size: int, codes: torch.Tensor | None = None,
                    scales: torch.Tensor | None = None, packed: torch.Tensor | None = None):
    """w [N, K] (any float dtype, unit stride along K) → codes int8 [N, K], scales f32 [N, G], packed uint8
    [N, ⌈K/4⌉]; ``group_size`` = K for one scale per row.
    """
    n, k = w.shape
    groups, kb = triton.cdiv(k, group_size), triton.cdiv(k, 4)
    codes = torch.empty((n, k), dtype=torch.int8, device=w.device) if codes is None else codes
    scales = torch.empty((n, groups), dtype=torch.float32, device=w.device) if scales is None else scales
    packed = torch.empty((n, kb), dtype=torch.uint8, device=w.device) if packed is None else packed
    if n == 0:
        return codes, scales, packed
    block = min(256, triton.next_power_of_2(group_size))
    block_n = max(1, min(16, 4096 // block, triton.next_power_of_2(n)))
    _absmean_scales_kernel[(triton.cdiv(n, block_n), groups)](w, scales, n, k, groups, group_size, w.stride(0),
                                                              BLOCK_N=block_n, BLOCK=block)
    block_b = min(64, triton.next_power_of_2(kb))
    block_n = max(1, min(16, 1024 // block_b, triton.next_power_of_2(n)))
    _ternary_codes_kernel[(triton.cdiv(n, block_n), triton.cdiv(kb, block_b))](
        w, scales, codes, packed, n, k, kb, groups, group_size, w.stride(0), BLOCK_N=block_n, BLOCK_B=block_b)
    return codes, scales, packed


# ----------------------------------------------------------------------------------- ternary-weight GEMM (3 modes)

MODE_FORWARD, MODE_GRAD_INPUT, MODE_PACKED = 0, 1, 2


@triton.jit
def _ternary_mm_kernel(a_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, R, C, G, GS,
                       stride_am, stride_ar, stride_wn, stride_om,
                       MODE: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, C] = a[M, R] @ B[R, C] where B is the dequantized ternary weight W [N, K], read from its codes:

    MODE_FORWARD: B = Wᵀ (R = K, C = N), int8 codes;  MODE_GRAD_INPUT: B = W (R = N, C = K), int8 codes;
    MODE_PACKED: B = Wᵀ from 2-bit packed codes. Codes become the dot's dtype in registers and are never written
    back; with one scale per row and B = Wᵀ the scale multiplies the fp32 accumulator after the loop, otherwise
    codes × scales are formed in fp32 (the reference's dequantized weight) before the cast.
    """
    offs_m, offs_c, mask_m, mask_c = output_tile(M, C, BLOCK_M, BLOCK_C, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        a, offs_r, mask_r = k_step_rows(a_ptr, offs_m, mask_m, r0, R, stride_am, stride_ar, BLOCK_R)
        if MODE == 1:
            n = offs_r[:, None]
            k = offs_c[None, :]
        else:
            n = offs_c[None, :]
            k = offs_r[:, None]
        mask_b = mask_r[:, None] & mask_c[None, :]
        if MODE == 2:
            byte = tl.load(w_ptr + n * stride_wn + k // 4, mask=mask_b, other=85)  # 0b01010101: four zero-codes
            code = ((byte.to(tl.int32) >> ((k % 4) * 2)) & 3) - 1
        else:
            code = tl.load(w_ptr + n * stride_wn + k, mask=mask_b, other=0)
        if UPCAST:  # TRITON_INTERPRET: bf16 tl.dot is wrong in the interpreter, compute in fp32
            a = a.to(tl.float32)
        if ROW_SCALE and MODE != 1:  # the row's scale multiplies the accumulator after the loop
            b = code.to(a.dtype)
        elif ROW_SCALE:
            b = (code.to(tl.float32) * tl.load(scales_ptr + offs_r, mask=mask_r, other=0.0)[:, None]).to(a.dtype)
        else:
            b = (code.to(tl.float32) * tl.load(scales_ptr + n * G + k // GS, mask=mask_b, other=0.0)).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if ROW_SCALE:
        if MODE != 1:
            acc = acc * tl.load(scales_ptr + offs_c, mask=mask_c, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_c[None, :])


def mm_config(m: int, interpret: bool) -> dict:
    """Fixed block sizes of ``_ternary_mm_kernel`` by token count (GPU values untuned: they need an H100)."""
    if interpret:  # few, large programs: the interpreter's cost is per program and per op
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(m))), BLOCK_C=64, BLOCK_R=64, GROUP_M=8,
                    num_warps=4, num_stages=1)
    if m <= 64:  # decode / small batch: memory-bound on the weight, many column blocks to fill the SMs
        return dict(BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_C=32, BLOCK_R=256, GROUP_M=1,
                    num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_C=128, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3)


def ternary_mm(a: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, group_size: int, mode: int,
               in_features: int, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               interpret: bool = False, config: dict | None = None) -> torch.Tensor:
    """``a @ Wᵀ (+ bias)`` for MODE_FORWARD / MODE_PACKED, ``a @ W`` for MODE_GRAD_INPUT; output dtype of ``a``.

    ``w``: int8 codes [N, K] or, for MODE_PACKED, uint8 [N, ⌈K/4⌉]; ``scales`` f32 [N, G]; ``group_size`` = K for
    one scale per row; ``in_features`` = K; ``config`` overrides ``mm_config`` (tests, tuning).
    """
    m, r = a.shape
    n, k, groups = w.shape[0], in_features, scales.shape[1]
    c = k if mode == MODE_GRAD_INPUT else n
    if out is None:
        out = torch.empty((m, c), dtype=a.dtype, device=a.device)
    if m == 0 or c == 0:
        return out
    if r == 0:
        return out.copy_(bias.expand(m, c) if bias is not None else out.new_zeros(m, c))
    cfg = config or mm_config(m, interpret)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c, cfg["BLOCK_C"]),)
    _ternary_mm_kernel[grid](
        a, w, scales, bias if bias is not None else scales, out, m, r, c, groups, group_size,
        a.stride(0), a.stride(1), w.stride(0), out.stride(0),
        MODE=mode, ROW_SCALE=groups == 1, HAS_BIAS=bias is not None, UPCAST=interpret,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **cfg)
    return out


# ------------------------------------------------------------------------------------------- int8 activation path

@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """Per-token absmax int8: inv = fp32(127 / absmax), code = round-half-even(x × inv) on the exact fp64 product."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    amax = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask_m[:, None] & (offs[None, :] < K),
                    other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    top = tl.maximum(tl.max(amax, axis=1).to(tl.float64), 5.421010862427522e-20)  # ACT_TINY = 2^-64
    inv = (127.0 / top).to(tl.float32).to(tl.float64)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = mask_m[:, None] & (offs[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0)
        q = x.to(tl.float64) * inv[:, None]
        q = (q + 6755399441055744.0) - 6755399441055744.0  # 1.5 × 2^52: rounds half to even for |q| < 2^51
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + rows[:, None] * stride_q + offs[None, :], q.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, (top / 127.0).to(tl.float32), mask=mask_m)


def quantize_activations(x: torch.Tensor, codes: torch.Tensor | None = None, scales: torch.Tensor | None = None):
    """x [M, K] (unit stride along K) → codes int8 [M, K], scales f32 [M]."""
    m, k = x.shape
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device) if codes is None else codes
    scales = torch.empty((m,), dtype=torch.float32, device=x.device) if scales is None else scales
    if m:
        block = min(1024, triton.next_power_of_2(max(k, 1)))
        block_m = max(1, min(16, 4096 // block, triton.next_power_of_2(m)))
        _act_quant_kernel[(triton.cdiv(m, block_m),)](x, codes, scales, m, k, x.stride(0), codes.stride(0),
                                                      BLOCK_M=block_m, BLOCK=block)
    return codes, scales


@triton.jit
def _int8_mm_kernel(xq_ptr, xs_ptr, codes_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, G, GS,
                    stride_xm, stride_cn, stride_om, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = (xq @ codesᵀ in int32) × weight scales × token scales (+ bias), the scales in the epilogue.

    One scale per row: a single int32 accumulator, exact. Groups: BLOCK_K divides the group size, so each block's
    int32 partial product belongs to one group and is scaled before it joins the fp32 accumulator.
    """
    offs_m, offs_n, mask_m, mask_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a, offs_k, mask_k = k_step_rows(xq_ptr, offs_m, mask_m, k0, K, stride_xm, 1, BLOCK_K)
        b = tl.load(codes_ptr + offs_n[None, :] * stride_cn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        # out_dtype named: Triton 3.6 defaults it to float32 and then rejects an int32 accumulator
        if ROW_SCALE:
            acc_i = tl.dot(a, b, acc_i, out_dtype=tl.int32)
        else:
            part = tl.dot(a, b, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32), out_dtype=tl.int32)
            ws = tl.load(scales_ptr + offs_n * G + k0 // GS, mask=mask_n, other=0.0)
            acc = acc + part.to(tl.float32) * ws[None, :]
    if ROW_SCALE:
        acc = acc_i.to(tl.float32) * tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    acc = acc * tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def int8_config(m: int, interpret: bool) -> dict:
    """Fixed block sizes of ``_int8_mm_kernel`` (GPU values untuned: they need an H100)."""
    if interpret:
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(m))), BLOCK_N=64, GROUP_M=8, num_warps=4)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def int8_block_k(group_size: int, in_features: int) -> int | None:
    """BLOCK_K for the int8 GEMM: any for one scale per row, else a power of two ≥ 16 dividing the group size."""
    if group_size >= in_features:
        return 128
    for block in (128, 64, 32, 16):
        if group_size % block == 0:
            return block
    return None


def int8_mm(xq: torch.Tensor, xs: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
            out_dtype: torch.dtype, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
            interpret: bool = False, config: dict | None = None) -> torch.Tensor:
    """xq int8 [M, K], xs f32 [M], codes int8 [N, K], scales f32 [N, G] → [M, N] of ``out_dtype``.

    ``config`` overrides the block sizes of ``int8_config`` (tests, tuning); BLOCK_K always follows the groups.
    """
    m, k = xq.shape
    n, groups = codes.shape[0], scales.shape[1]
    block_k = int8_block_k(group_size, k)
    if block_k is None:
        raise ValueError(f"int8 ternary GEMM: group_size={group_size} must be a multiple of 16")
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    cfg = config or int8_config(m, interpret)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _int8_mm_kernel[grid](xq, xs, codes, scales, bias if bias is not None else scales, out, m, n, k, groups,
                          group_size, xq.stride(0), codes.stride(0), out.stride(0), ROW_SCALE=groups == 1,
                          HAS_BIAS=bias is not None, BLOCK_K=block_k, **cfg)
    return out
