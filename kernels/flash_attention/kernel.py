"""Triton flash-attention kernels, forward and backward (math in kernels/README.md).

Notation for one (batch, head) slice, rows i over queries, columns j over keys, 0 ≤ i, j < L:
    S_ij = q_i·k_j / √d                      scores (never stored in global memory)
    P_ij = exp(S_ij − lse_i)                  softmax, lse_i = log Σ_j exp(S_ij)
    O_i  = Σ_j P_ij v_j                       output
    D_i  = Σ_d dO_id·O_id = Σ_j P_ij dP_ij    (dP_ij = dO_i·v_j)
    dS_ij = P_ij (dP_ij − D_i)
    dV_j = Σ_i P_ij dO_i,  dK_j = Σ_i dS_ij q_i / √d,  dQ_i = Σ_j dS_ij k_j / √d

Scores are kept in base 2: s2 = S·log2(e), so exp becomes exp2; the saved statistic LSE2 = lse·log2(e).
Tensors are N x heads x L x d with unit stride along d; the other three strides are arguments, so
non-contiguous q, k, v (a permuted qkv projection) are read in place. Rows and columns past L are
masked: loads give 0 there, scores of missing keys are −inf, and stores skip missing rows.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_common import mma

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(s) = exp2(s·log2 e)


@triton.jit
def attn_forward_kernel(
    Q, K, V, O,        # [Z, H, L, D] (unit stride along D); O contiguous
    LSE2,              # [Z·H, L] fp32, base-2 log-sum-exp of each row, saved for backward
    stride_qz, stride_qh, stride_ql,
    stride_kz, stride_kh, stride_kl,
    stride_vz, stride_vh, stride_vl,
    H, L,
    sm_scale,          # 1/√d
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program id → (batch·head, query block), the blocks of one head adjacent (op.attention_grid).
    num_m_blocks = tl.cdiv(L, BLOCK_M)
    pid_zh = tl.program_id(0) // num_m_blocks
    pid_m = tl.program_id(0) % num_m_blocks
    z = pid_zh // H
    h = pid_zh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < L
    q_base = Q + z.to(tl.int64) * stride_qz + h * stride_qh
    k_base = K + z.to(tl.int64) * stride_kz + h * stride_kh
    v_base = V + z.to(tl.int64) * stride_vz + h * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of s2
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running Σ exp2(s2 − m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)      # running Σ exp2(s2 − m_i) v
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_mask = cols < L
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=col_mask[:, None], other=0.0)
        s2 = mma(q, tl.trans(k), UPCAST, PRECISION) * qk_scale          # [BLOCK_M, BLOCK_N]
        s2 = tl.where(col_mask[None, :], s2, float("-inf"))
        # Online softmax: rescale what was summed under the old max by 2^(m_old − m_new). Every
        # block has at least one valid column, so m_new is finite and the first alpha is 2^−∞ = 0.
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        p = tl.math.exp2(s2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=col_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = O + pid_zh.to(tl.int64) * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_mask[:, None])
    tl.store(LSE2 + pid_zh.to(tl.int64) * L + offs_m, m_i + tl.math.log2(l_i), mask=row_mask)


@triton.jit
def attn_backward_preprocess_kernel(
    O, DO,             # [Z·H·L, D] contiguous output and its gradient
    DELTA,             # [Z·H·L] fp32: D_i = Σ_d dO_id·O_id
    ROWS,              # Z·H·L
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = rows < ROWS
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(O + offs, mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=mask)


@triton.jit
def _probabilities(q, k, lse2, row_mask, col_mask, qk_scale, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    """P = exp2(s2 − LSE2) for a [BLOCK_M, BLOCK_N] block, exactly 0 outside the L x L square."""
    s2 = mma(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
    p = tl.math.exp2(s2 - lse2[:, None])
    return tl.where(row_mask[:, None] & col_mask[None, :], p, 0.0)


@triton.jit
def attn_backward_dkdv_kernel(
    Q, K, V, DO,       # [Z, H, L, D] inputs (unit stride along D) and dO (contiguous)
    DK, DV,            # [Z, H, L, D] contiguous gradients
    LSE2, DELTA,       # [Z·H, L] fp32 from the forward and the preprocess kernel
    stride_qz, stride_qh, stride_ql,
    stride_kz, stride_kh, stride_kl,
    stride_vz, stride_vh, stride_vl,
    H, L,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per key block: dV_j = Σ_i P_ij dO_i and dK_j = Σ_i dS_ij q_i / √d, looping over
    query blocks, so each dK, dV row is written once (no atomics)."""
    num_n_blocks = tl.cdiv(L, BLOCK_N)
    pid_zh = tl.program_id(0) // num_n_blocks  # (batch, head)
    pid_n = tl.program_id(0) % num_n_blocks    # key block
    z = pid_zh // H
    h = pid_zh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_mask = offs_n < L
    q_base = Q + z.to(tl.int64) * stride_qz + h * stride_qh
    k_base = K + z.to(tl.int64) * stride_kz + h * stride_kh
    v_base = V + z.to(tl.int64) * stride_vz + h * stride_vh
    row_base = pid_zh.to(tl.int64) * L  # start of this slice in LSE2, DELTA and the contiguous tensors
    k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=col_mask[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=col_mask[:, None], other=0.0)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, L, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < L
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :], mask=row_mask[:, None], other=0.0)
        do = tl.load(DO + (row_base + rows[:, None]) * HEAD_DIM + offs_d[None, :],
                     mask=row_mask[:, None], other=0.0)
        lse2 = tl.load(LSE2 + row_base + rows, mask=row_mask, other=0.0)
        delta = tl.load(DELTA + row_base + rows, mask=row_mask, other=0.0)
        p = _probabilities(q, k, lse2, row_mask, col_mask, qk_scale, UPCAST, PRECISION)  # [M, N]
        dv += mma(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)
        dp = mma(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dk += mma(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
    dk = dk * sm_scale
    out = (row_base + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=col_mask[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_mask[:, None])


@triton.jit
def attn_backward_dq_kernel(
    Q, K, V, DO,
    DQ,                # [Z, H, L, D] contiguous
    LSE2, DELTA,
    stride_qz, stride_qh, stride_ql,
    stride_kz, stride_kh, stride_kl,
    stride_vz, stride_vh, stride_vl,
    H, L,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per query block: dQ_i = Σ_j dS_ij k_j / √d, looping over key blocks."""
    num_m_blocks = tl.cdiv(L, BLOCK_M)
    pid_zh = tl.program_id(0) // num_m_blocks  # (batch, head)
    pid_m = tl.program_id(0) % num_m_blocks    # query block
    z = pid_zh // H
    h = pid_zh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < L
    q_base = Q + z.to(tl.int64) * stride_qz + h * stride_qh
    k_base = K + z.to(tl.int64) * stride_kz + h * stride_kh
    v_base = V + z.to(tl.int64) * stride_vz + h * stride_vh
    row_base = pid_zh.to(tl.int64) * L
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + (row_base + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
                 mask=row_mask[:, None], other=0.0)
    lse2 = tl.load(LSE2 + row_base + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_mask, other=0.0)
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_mask = cols < L
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=col_mask[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=col_mask[:, None], other=0.0)
        p = _probabilities(q, k, lse2, row_mask, col_mask, qk_scale, UPCAST, PRECISION)
        dp = mma(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, UPCAST, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + (row_base + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_mask[:, None])
