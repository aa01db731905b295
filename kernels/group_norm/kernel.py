"""Triton kernels for GroupNorm + FiLM + SiLU, forward and backward (math in kernels/README.md).

Notation (per sample n, group g; M = (C/G)·H·W elements in the group):
    μ, σ² = mean and (biased) variance of x over the group, rstd = 1/√(σ² + eps)
    x̂ = (x − μ)·rstd                 normalised input
    u = γ_c·x̂ + β_c                   GroupNorm output
    a = u·(1 + s_nc) + t_nc           FiLM (s = scale, t = shift; absent means s = t = 0)
    y = silu(a) = a·σ(a)  (or y = a)  activation

Every kernel works on a 2-D tile [BLOCK_C channels x BLOCK_HW positions] of one (n, g) group, with
BLOCK_C = next_pow2(C/G) and BLOCK_HW = min(TILE // BLOCK_C, next_pow2(H·W)) (TILE is pinned by op.py),
walking the H·W positions tile by tile. x is read as contiguous N x C x H x W, so a group is one
contiguous run of M elements.

When the whole group fits one tile (ONE_TILE: BLOCK_C·next_pow2(H·W) ≤ TILE, the common case at the
U-Net's sizes) the tile stays in registers: the forward reads x once, the backward reads x and dy once.
Larger groups take two passes over the tiles (statistics then output; sums then dx), re-reading them.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _group_tile(n, g, hw_start, C, HW, CPG, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets into an N x C x H x W tensor of one tile of group g, and the tile's mask."""
    ch_in_group = tl.arange(0, BLOCK_C)
    hw = hw_start + tl.arange(0, BLOCK_HW)
    channel = g * CPG + ch_in_group  # [BLOCK_C]
    mask = (ch_in_group[:, None] < CPG) & (hw[None, :] < HW)
    offsets = (n * C + channel[:, None]).to(tl.int64) * HW + hw[None, :]
    return offsets, mask


@triton.jit
def gn_forward_kernel(
    X, Y,            # [N, C, H, W] input and output (same dtype)
    W, B,            # [C] GroupNorm weight γ and bias β
    SCALE, SHIFT,    # [N, C] FiLM terms (unused unless HAS_FILM)
    MEAN, RSTD,      # [N, G] fp32 statistics, saved for backward
    C, HW, CPG, G,   # channels, H·W, channels per group, groups
    eps,
    HAS_FILM: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, HW_POW2: tl.constexpr, TILE: tl.constexpr,
):
    BLOCK_HW: tl.constexpr = TILE // BLOCK_C if TILE // BLOCK_C < HW_POW2 else HW_POW2
    ONE_TILE: tl.constexpr = BLOCK_C * HW_POW2 <= TILE
    pid = tl.program_id(0)  # one program per (n, g)
    n = pid // G
    g = pid % G
    channel = g * CPG + tl.arange(0, BLOCK_C)
    ch_mask = tl.arange(0, BLOCK_C) < CPG

    # Statistics in fp32: from the one tile, or merged tile by tile with Chan et al.'s parallel update
    # (both avoid the cancellation of E[x²] − E[x]²).
    if ONE_TILE:
        offsets, mask = _group_tile(n, g, 0, C, HW, CPG, BLOCK_C, BLOCK_HW)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        count, mean, m2 = _tile_moments(x, mask)
    else:
        count = tl.zeros([], tl.float32)
        mean = tl.zeros([], tl.float32)
        m2 = tl.zeros([], tl.float32)
        for hw_start in range(0, HW, BLOCK_HW):
            offsets, mask = _group_tile(n, g, hw_start, C, HW, CPG, BLOCK_C, BLOCK_HW)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            tile_count, tile_mean, tile_m2 = _tile_moments(x, mask)
            new_count = count + tile_count
            delta = tile_mean - mean
            mean = mean + delta * (tile_count / new_count)
            m2 = m2 + tile_m2 + delta * delta * (count * tile_count / new_count)
            count = new_count
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)

    # Normalise, modulate, activate, with the per-channel factors folded:
    # a = (x − μ)·k + c with k = rstd·γ·(1 + s), c = β·(1 + s) + t.
    gamma = tl.load(W + channel, mask=ch_mask, other=0.0).to(tl.float32)
    beta = tl.load(B + channel, mask=ch_mask, other=0.0).to(tl.float32)
    one_plus_s, t = _film_terms(SCALE, SHIFT, n * C + channel, ch_mask, HAS_FILM, BLOCK_C)
    k = rstd * gamma * one_plus_s
    c = beta * one_plus_s + t
    if ONE_TILE:  # the tile is still in registers
        tl.store(Y + offsets, _film_silu(x, mean, k, c, SILU).to(Y.dtype.element_ty), mask=mask)
    else:  # re-read each tile (from L2 on a GPU) and write it once
        for hw_start in range(0, HW, BLOCK_HW):
            offsets, mask = _group_tile(n, g, hw_start, C, HW, CPG, BLOCK_C, BLOCK_HW)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + offsets, _film_silu(x, mean, k, c, SILU).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gn_backward_kernel(
    X, DY, DX,                 # [N, C, H, W] input, upstream gradient, input gradient
    W, B,                      # [C] γ and β
    SCALE, SHIFT,              # [N, C] FiLM terms (unused unless HAS_FILM)
    MEAN, RSTD,                # [N, G] saved statistics
    DSCALE, DSHIFT,            # [N, C] gradients of the FiLM terms (written only if HAS_FILM)
    DW_PART, DB_PART,          # [N, C] fp32 per-sample partial sums of dγ and dβ
    C, HW, CPG, G,
    inv_group_size,            # 1 / ((C/G)·H·W)
    HAS_FILM: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, HW_POW2: tl.constexpr, TILE: tl.constexpr,
):
    BLOCK_HW: tl.constexpr = TILE // BLOCK_C if TILE // BLOCK_C < HW_POW2 else HW_POW2
    ONE_TILE: tl.constexpr = BLOCK_C * HW_POW2 <= TILE
    pid = tl.program_id(0)  # one program per (n, g)
    n = pid // G
    g = pid % G
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    channel = g * CPG + tl.arange(0, BLOCK_C)
    ch_mask = tl.arange(0, BLOCK_C) < CPG
    gamma = tl.load(W + channel, mask=ch_mask, other=0.0).to(tl.float32)
    beta = tl.load(B + channel, mask=ch_mask, other=0.0).to(tl.float32)
    one_plus_s, t = _film_terms(SCALE, SHIFT, n * C + channel, ch_mask, HAS_FILM, BLOCK_C)

    # Per-channel sums over H·W of da = ∂L/∂a and of da·x̂: from the one tile, or tile by tile.
    if ONE_TILE:
        offsets, mask = _group_tile(n, g, 0, C, HW, CPG, BLOCK_C, BLOCK_HW)
        xhat, da = _tile_xhat_da(X, DY, offsets, mask, mean, rstd, gamma, beta, one_plus_s, t, SILU)
        sum_da = tl.sum(da, axis=1)
        sum_da_xhat = tl.sum(da * xhat, axis=1)
    else:
        sum_da = tl.zeros([BLOCK_C], tl.float32)
        sum_da_xhat = tl.zeros([BLOCK_C], tl.float32)
        for hw_start in range(0, HW, BLOCK_HW):
            offsets, mask = _group_tile(n, g, hw_start, C, HW, CPG, BLOCK_C, BLOCK_HW)
            xhat, da = _tile_xhat_da(X, DY, offsets, mask, mean, rstd, gamma, beta, one_plus_s, t, SILU)
            sum_da += tl.sum(da, axis=1)
            sum_da_xhat += tl.sum(da * xhat, axis=1)
    _store_film_and_param_grads(DSCALE, DSHIFT, DW_PART, DB_PART, n * C + channel, ch_mask, sum_da,
                                sum_da_xhat, gamma, beta, one_plus_s, HAS_FILM)

    # dx̂ = da·(1 + s)·γ;  dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) over the group's M elements.
    coef = one_plus_s * gamma
    mean_dxhat = tl.sum(coef * sum_da, axis=0) * inv_group_size
    mean_dxhat_xhat = tl.sum(coef * sum_da_xhat, axis=0) * inv_group_size
    if ONE_TILE:  # x̂ and da are still in registers
        dx = _grad_x(xhat, da, coef, rstd, mean_dxhat, mean_dxhat_xhat)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    else:  # re-read x and dy tile by tile
        for hw_start in range(0, HW, BLOCK_HW):
            offsets, mask = _group_tile(n, g, hw_start, C, HW, CPG, BLOCK_C, BLOCK_HW)
            xhat, da = _tile_xhat_da(X, DY, offsets, mask, mean, rstd, gamma, beta, one_plus_s, t, SILU)
            dx = _grad_x(xhat, da, coef, rstd, mean_dxhat, mean_dxhat_xhat)
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _tile_moments(x, mask):
    """(count, mean, M2 = Σ (x − mean)²) of the masked elements of one fp32 tile."""
    count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    dev = tl.where(mask, x - mean, 0.0)
    return count, mean, tl.sum(tl.sum(dev * dev, axis=1), axis=0)


@triton.jit
def _film_silu(x, mean, k, c, SILU: tl.constexpr):
    """y of one fp32 tile: a = (x − μ)·k + c per channel, then silu(a) (or a)."""
    a = (x - mean) * k[:, None] + c[:, None]
    if SILU:
        a = a * tl.sigmoid(a)
    return a


@triton.jit
def _tile_xhat_da(X, DY, offsets, mask, mean, rstd, gamma, beta, one_plus_s, t, SILU: tl.constexpr):
    """(x̂, da) of one tile in fp32, da zero outside the mask."""
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    da = _grad_a(xhat, dy, gamma, beta, one_plus_s, t, SILU)
    return xhat, tl.where(mask, da, 0.0)


@triton.jit
def _store_film_and_param_grads(DSCALE, DSHIFT, DW_PART, DB_PART, offsets, ch_mask, sum_da, sum_da_xhat,
                                gamma, beta, one_plus_s, HAS_FILM: tl.constexpr):
    """dshift = Σ da,  dscale = Σ da·u = γ Σ da·x̂ + β Σ da;  the per-sample parts of dβ and dγ are
    (1 + s) times Σ da and Σ da·x̂. offsets: the rows n·C + channel of the group's channels."""
    if HAS_FILM:
        tl.store(DSHIFT + offsets, sum_da.to(DSHIFT.dtype.element_ty), mask=ch_mask)
        dscale = gamma * sum_da_xhat + beta * sum_da
        tl.store(DSCALE + offsets, dscale.to(DSCALE.dtype.element_ty), mask=ch_mask)
    tl.store(DB_PART + offsets, one_plus_s * sum_da, mask=ch_mask)
    tl.store(DW_PART + offsets, one_plus_s * sum_da_xhat, mask=ch_mask)


@triton.jit
def _grad_x(xhat, da, coef, rstd, mean_dxhat, mean_dxhat_xhat):
    """dx of one tile: rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with dx̂ = da·coef, coef = (1 + s)·γ."""
    dxhat = da * coef[:, None]
    return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)


@triton.jit
def _film_terms(SCALE, SHIFT, offsets, ch_mask, HAS_FILM: tl.constexpr, BLOCK_C: tl.constexpr):
    """(1 + s, t), fp32 [BLOCK_C], of the FiLM rows at `offsets` (n·C + channel); (1, 0) without FiLM."""
    if HAS_FILM:
        one_plus_s = 1.0 + tl.load(SCALE + offsets, mask=ch_mask, other=0.0).to(tl.float32)
        t = tl.load(SHIFT + offsets, mask=ch_mask, other=0.0).to(tl.float32)
    else:
        one_plus_s = tl.full([BLOCK_C], 1.0, tl.float32)
        t = tl.zeros([BLOCK_C], tl.float32)
    return one_plus_s, t


@triton.jit
def _grad_a(xhat, dy, gamma, beta, one_plus_s, t, SILU: tl.constexpr):
    """∂L/∂a from ∂L/∂y: silu'(a) = σ(a)·(1 + a·(1 − σ(a))); a is recomputed, never stored."""
    if SILU:
        a = (xhat * gamma[:, None] + beta[:, None]) * one_plus_s[:, None] + t[:, None]
        sig = tl.sigmoid(a)
        da = dy * sig * (1.0 + a * (1.0 - sig))
    else:
        da = dy
    return da


@triton.jit
def gn_param_grad_kernel(
    DW_PART, DB_PART,  # [N, C] fp32 per-sample partial sums
    DW, DB,            # [C] gradients of γ and β (in the parameters' dtype)
    N, C,
    BLOCK: tl.constexpr,
):
    """dγ_c = Σ_n DW_PART[n, c], dβ_c = Σ_n DB_PART[n, c]: a deterministic reduction, no atomics."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    for n in range(0, N):
        dw += tl.load(DW_PART + n * C + c, mask=mask, other=0.0)
        db += tl.load(DB_PART + n * C + c, mask=mask, other=0.0)
    tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=mask)
    tl.store(DB + c, db.to(DB.dtype.element_ty), mask=mask)
