"""Triton helpers shared by the kernel families."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile of an [M, N] output: row offsets, column offsets and their in-bounds masks.

    Program ids walk the tiles in groups of GROUP_M row tiles: the programs of a group walk the columns together,
    so the operand tiles they share are still in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def k_step_rows(ptr, rows, row_mask, k0, K, stride_row, stride_k, BLOCK_K: tl.constexpr):
    """One step of a GEMM's K loop on its row-major left operand: the [rows, BLOCK_K] tile at columns k0.. (zeros
    outside), with the column offsets and mask that the right operand's load and scales reuse."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    tile = tl.load(ptr + rows[:, None] * stride_row + offs_k[None, :] * stride_k,
                   mask=row_mask[:, None] & mask_k[None, :], other=0.0)
    return tile, offs_k, mask_k
