"""Triton kernels for quantized linear layers: integer weight codes (QAT, bits 4–8) and fp8 GEMMs.

Launch helpers take 2-D tensors and return new ones; argument checks, backend choice and autograd live in
``tgolf.ops.quant``. The integer quantizer here reproduces ``tgolf.ops.quant.reference.quantize_weight`` bit for
bit (correctly rounded divisions, round-half-even, fp16-rounded scales); the fp8 quantizer reproduces
``reference.quantize_fp8`` (power-of-two scales, round-to-nearest-even computed with integer arithmetic because
the Triton interpreter's float → fp8 cast rounds some values wrongly, while casting an exact fp8 value is exact).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgolf.backend import triton_interpret
from tgolf.kernels.common import k_step_rows, output_tile

_FP16_TINY = tl.constexpr(2.0 ** -24)  # reference.FP16_TINY
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + M) - M rounds |y| < 2^22 to nearest-even
_AMAX_LO = tl.constexpr(2.0 ** -60)  # reference.AMAX_RANGE
_AMAX_HI = tl.constexpr(2.0 ** 60)

# fp8 formats: the mantissa bits, the largest finite value as 1.75 * 2^MAX_EXP, the smallest normal 2^MIN_EXP.
_FP8_SPECS = {
    torch.float8_e4m3fn: dict(MANT=3, MAX_EXP=8, MIN_EXP=-6),
    torch.float8_e5m2: dict(MANT=2, MAX_EXP=15, MIN_EXP=-14),
}


@triton.jit
def _round_half_even(y):
    """Nearest integer, ties to even (torch.round), for |y| < 2^22; exact IEEE adds, no library call."""
    return (y + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _round_to_bf16(v):
    """fp32 ``v`` rounded to nearest-even bf16 precision, still fp32: casting it to bf16 is then exact, also
    under the Triton interpreter, whose fp32 → bf16 cast truncates."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & (-65536)
    return bits.to(tl.float32, bitcast=True)


# ------------------------------------------------------------------------------------------------------------
# Integer weight codes (QAT)
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _quantize_codes_kernel(w_ptr, clip_ptr, codes_ptr, scales_ptr, dequant_ptr, N, K, G, GROUP, stride_wn,
                           stride_wk, qmax, HAS_CLIP: tl.constexpr, DEQUANT: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """One program per (BLOCK_N rows, one group): the group's clip (absmax unless given), scale, codes, and
    (DEQUANT) codes * scale in dequant_ptr's dtype."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_mask = rn < N
    k_start = g * GROUP
    k_end = tl.minimum(k_start + GROUP, K)
    if HAS_CLIP:
        clip = tl.load(clip_ptr + rn * G + g, mask=n_mask, other=0.0)
    else:
        clip = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask = n_mask[:, None] & (rk[None, :] < k_end)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0)
            clip = tl.maximum(clip, tl.max(tl.abs(w.to(tl.float32)), axis=1))
    # reference: (clip / qmax).clamp_min(FP16_TINY).to(float16).float()
    scale = tl.maximum(tl.math.div_rn(clip, qmax + tl.zeros_like(clip)), _FP16_TINY).to(tl.float16).to(tl.float32)
    tl.store(scales_ptr + rn * G + g, scale, mask=n_mask)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (rk[None, :] < k_end)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0)
        y = tl.math.div_rn(w.to(tl.float32), scale[:, None] + tl.zeros_like(w.to(tl.float32)))
        # clamping before rounding equals rounding before clamping: qmax is an integer
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        codes = _round_half_even(y)
        tl.store(codes_ptr + rn[:, None] * K + rk[None, :], codes.to(tl.int8), mask=mask)
        if DEQUANT:  # codes * scale is exact in fp32; the cast rounds as reference's .to(dtype)
            dequant = codes * scale[:, None]
            if dequant_ptr.dtype.element_ty == tl.bfloat16:
                dequant = _round_to_bf16(dequant)
            tl.store(dequant_ptr + rn[:, None] * K + rk[None, :], dequant.to(dequant_ptr.dtype.element_ty),
                     mask=mask)


def quantize_codes(w: torch.Tensor, qmax: int, group_size: int, clip: torch.Tensor | None = None,
                   dequant_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``w`` [N, K] → (int8 codes [N, K], float32 scales [N, ceil(K / group_size)], dequantized weight [N, K] in
    ``dequant_dtype`` or None); ``clip`` [N, G] is given, or the absmax of each row (group)."""
    n, k = w.shape
    groups = triton.cdiv(k, group_size)
    codes = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scales = torch.empty((n, groups), dtype=torch.float32, device=w.device)
    dequant = None if dequant_dtype is None else torch.empty((n, k), dtype=dequant_dtype, device=w.device)
    block_k = min(triton.next_power_of_2(group_size), 1024)
    block_n = max(1, min(64, 4096 // block_k))
    grid = (triton.cdiv(n, block_n), groups)
    _quantize_codes_kernel[grid](w, clip if clip is not None else scales, codes, scales,
                                 dequant if dequant is not None else scales, n, k, groups, group_size,
                                 w.stride(0), w.stride(1), float(qmax), HAS_CLIP=clip is not None,
                                 DEQUANT=dequant is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return codes, scales, dequant


@triton.jit
def _qat_matmul_kernel(a_ptr, codes_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, G, GROUP,
                       stride_am, stride_ak, stride_om, stride_on,
                       WEIGHT_ROWS_ARE_N: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] = a[M, K] @ B[K, N], B read from the int8 weight codes and dequantized in registers.

    WEIGHT_ROWS_ARE_N: B = Wq.T (the forward, weight [N, K]); else B = Wq (the input gradient, weight [K, N]).
    Codes are contiguous; scales [weight rows, G] with GROUP weight columns per scale.
    """
    rm, rn, m_mask, n_mask = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if WEIGHT_ROWS_ARE_N:
        weight_cols = K
    else:
        weight_cols = N
    if PER_ROW and WEIGHT_ROWS_ARE_N:  # one scale per output column: load it once
        col_scale = tl.load(scales_ptr + rn * G, mask=n_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a, rk, k_mask = k_step_rows(a_ptr, rm, m_mask, k0, K, stride_am, stride_ak, BLOCK_K)
        b_mask = k_mask[:, None] & n_mask[None, :]
        if WEIGHT_ROWS_ARE_N:
            w_row = rn[None, :]
            w_col = rk[:, None]
        else:
            w_row = rk[:, None]
            w_col = rn[None, :]
        codes = tl.load(codes_ptr + w_row * weight_cols + w_col, mask=b_mask, other=0).to(tl.float32)
        if PER_ROW:
            if WEIGHT_ROWS_ARE_N:
                b = codes * col_scale[None, :]
            else:
                b = codes * tl.load(scales_ptr + rk * G, mask=k_mask, other=0.0)[:, None]
        else:
            b = codes * tl.load(scales_ptr + w_row * G + w_col // GROUP, mask=b_mask, other=0.0)
        # codes * scale is exact in fp32; rounding it to x's dtype is the reference's cast
        if UPCAST:  # the interpreter's bf16 dot (and cast) is wrong: multiply the same rounded values in fp32
            a = a.to(tl.float32)
            b = _round_to_bf16(b)
        else:
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def gemm_blocks(fp8: bool, interpret: bool) -> dict:
    """Fixed tiles of the QAT and fp8 GEMMs (GPU values untuned: they need an H100)."""
    if interpret:  # small tiles so CPU tests cover several tiles and ragged edges quickly
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128 if fp8 else 64, GROUP_M=8, num_warps=8, num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays fp32 (as torch.matmul by default)


def qat_matmul(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, weight_rows_are_n: bool = True, config: dict | None = None
               ) -> torch.Tensor:
    """``a @ Wq.T + bias`` (weight_rows_are_n: codes [N, K]) or ``a @ Wq`` (codes [K, N]), Wq = codes * scales.

    The output has a's dtype; Wq is rounded to a's dtype before the dot, as ``F.linear(a, Wq.to(a.dtype))``.
    ``config`` overrides ``gemm_blocks`` (tests, tuning).
    """
    m, k = a.shape
    n = codes.shape[0] if weight_rows_are_n else codes.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    blocks = config or gemm_blocks(fp8=False, interpret=triton_interpret())
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
    if out.numel() == 0:
        return out
    _qat_matmul_kernel[grid](a, codes, scales, bias if bias is not None else out, out, m, n, k, scales.shape[1],
                             group_size, a.stride(0), a.stride(1), out.stride(0), out.stride(1),
                             WEIGHT_ROWS_ARE_N=weight_rows_are_n, PER_ROW=scales.shape[1] == 1,
                             HAS_BIAS=bias is not None, UPCAST=triton_interpret() and a.dtype == torch.bfloat16,
                             PRECISION=_precision(a.dtype), **blocks)
    return out


# ------------------------------------------------------------------------------------------------------------
# FP8
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _round_to_fp8_grid(v, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
    """fp32 ``v`` (|v| ≤ the format's max) rounded to nearest-even on the fp8 grid, still in fp32."""
    DROP: tl.constexpr = 23 - MANT
    bits = v.to(tl.int32, bitcast=True)
    # normal numbers: round the fp32 mantissa to MANT bits (sign-magnitude: adding to the low bits is safe)
    bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & (-(1 << DROP))
    normal = bits.to(tl.float32, bitcast=True)
    # subnormals: a fixed quantum 2^(MIN_EXP - MANT) (scaling by a power of two is exact); the sign is put
    # back bitwise so that values rounding to zero keep it (-0.0), as torch's cast does
    quantum: tl.constexpr = 2.0 ** (MIN_EXP - MANT)
    inv_quantum: tl.constexpr = 2.0 ** (MANT - MIN_EXP)
    magnitude = _round_half_even(tl.abs(v) * inv_quantum) * quantum
    sub = (magnitude.to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & (-2147483647 - 1)))
    return tl.where(tl.abs(v) < 2.0 ** MIN_EXP, sub.to(tl.float32, bitcast=True), normal)


@triton.jit
def _pow2_exponent(amax, MAX_EXP: tl.constexpr):
    """k with 2^k the smallest power of two such that amax ≤ 1.75 * 2^(MAX_EXP + k) (reference.fp8_scale)."""
    bits = tl.minimum(tl.maximum(amax, _AMAX_LO), _AMAX_HI).to(tl.int32, bitcast=True)
    exponent = (bits >> 23) - 127
    return exponent - MAX_EXP + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)


@triton.jit
def _fp8_quantize_kernel(x_ptr, amax_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_xk,
                         ROWWISE: tl.constexpr, MANT: tl.constexpr, MAX_EXP: tl.constexpr, MIN_EXP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HW_CAST: tl.constexpr):
    """Rows [BLOCK_M] of x → fp8 codes; the row's amax (ROWWISE) or the tensor's (read from amax_ptr).

    HW_CAST: the GPU's own conversion (round to nearest even, as torch's cast; one instruction per two values);
    else the rounding emulated in fp32 bits (the CPU interpreter), a dozen integer operations per value."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    if ROWWISE:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_mask[:, None] & (rk[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(amax_ptr).to(tl.float32)
    k = _pow2_exponent(amax, MAX_EXP)
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inv_scale = ((127 - k) << 23).to(tl.float32, bitcast=True)
    if ROWWISE:
        tl.store(scale_ptr + rm, scale, mask=m_mask)
    else:
        tl.store(scale_ptr + rm * 0, scale, mask=rm == 0)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0)
        v = x.to(tl.float32) * inv_scale[:, None]
        if not HW_CAST:
            v = _round_to_fp8_grid(v, MANT, MIN_EXP)
        tl.store(q_ptr + rm[:, None] * K + rk[None, :], v.to(q_ptr.dtype.element_ty), mask=mask)


def fp8_quantize(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D ``x`` → (fp8 codes [M, K] contiguous, float32 scales [M, 1] (rowwise) or []), as reference.quantize_fp8."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    scale = torch.empty((m, 1) if rowwise else (), dtype=torch.float32, device=x.device)
    # per tensor: one exact max reduction first (a max does not depend on the summation order)
    amax = scale if rowwise else torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float32)
    block_k = min(triton.next_power_of_2(k), 1024)
    block_m = max(1, min(64, 4096 // block_k))
    _fp8_quantize_kernel[(triton.cdiv(m, block_m),)](x, amax, q, scale, m, k, x.stride(0), x.stride(1),
                                                     ROWWISE=rowwise, **_FP8_SPECS[dtype], BLOCK_M=block_m,
                                                     BLOCK_K=block_k, HW_CAST=not triton_interpret(), num_warps=4)
    return q, scale


@triton.jit
def _fp8_matmul_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K,
                       stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
                       A_ROWWISE: tl.constexpr, B_COLWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] = (a[M, K] @ b[K, N]) * sa * sb + bias with fp8 a and b, fp32 accumulation."""
    rm, rn, m_mask, n_mask = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a, rk, k_mask = k_step_rows(a_ptr, rm, m_mask, k0, K, stride_am, stride_ak, BLOCK_K)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    if A_ROWWISE:
        acc *= tl.load(sa_ptr + rm, mask=m_mask, other=0.0)[:, None]
    else:
        acc *= tl.load(sa_ptr)
    if B_COLWISE:
        acc *= tl.load(sb_ptr + rn, mask=n_mask, other=0.0)[None, :]
    else:
        acc *= tl.load(sb_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def fp8_matmul(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
               bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``(a @ b) * sa * sb + bias``: a fp8 [M, K] with sa [] or [M, 1]; b fp8 [K, N] (any strides, e.g. ``w.T``)
    with sb [] or one scale per column (any shape of N elements); ``config`` overrides ``gemm_blocks``."""
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    blocks = config or gemm_blocks(fp8=True, interpret=triton_interpret())
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
    if out.numel() == 0:
        return out
    _fp8_matmul_kernel[grid](a, b, sa, sb.reshape(-1), bias if bias is not None else out, out, m, n, k,
                             a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                             A_ROWWISE=sa.dim() > 0, B_COLWISE=sb.dim() > 0, HAS_BIAS=bias is not None, **blocks)
    return out
