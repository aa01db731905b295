"""Fused GroupNorm + FiLM + SiLU as a torch.library custom op with a Triton forward and backward.

    y = act(GN(x; γ, β)·(1 + scale[:, :, None, None]) + shift[:, :, None, None])

`group_norm_film_silu` has the signature of the eager reference (kernels/group_norm/reference.py); the
kernels and their math are in kernels/group_norm/kernel.py and kernels/README.md. Two custom ops carry it:
`diffusion_kernels::group_norm_film_silu_fwd` (returns y and the fp32 mean and rstd saved for backward)
and `diffusion_kernels::group_norm_film_silu_bwd` (returns dx, dγ, dβ, dscale, dshift), tied together with
register_autograd, each with a fake (meta) implementation so torch.compile traces through them.

No `from __future__ import annotations` here: torch.library infers the op schemas from the annotations.
"""
from typing import Optional

import torch
import triton

from kernels.group_norm.kernel import gn_backward_kernel, gn_forward_kernel, gn_param_grad_kernel
from kernels.group_norm.reference import check_group_norm_args
from kernels.triton_common import (OP_NAMESPACE, check_device, check_dtype, check_grid, device_guard,
                                   launch_options, new_buffer, use_gpu_configs)

__all__ = ["group_norm_film_silu", "group_norm_config", "GN_GPU_CONFIGS", "GN_INTERPRET_CONFIG",
           "MAX_CHANNELS_PER_GROUP", "PARAM_GRAD_BLOCK"]

# The GPU configurations: TILE = elements of one (channels x positions) tile, and warps per program.
# compile_check.py compiles every entry; `group_norm_config` pins the one each launch uses.
GN_GPU_CONFIGS = [
    triton.Config({"TILE": 1024}, num_warps=4),
    triton.Config({"TILE": 2048}, num_warps=4),
    triton.Config({"TILE": 4096}, num_warps=8),
    triton.Config({"TILE": 8192}, num_warps=8),
]
# The interpreter's tile: large, so that few loop steps run in NumPy.
GN_INTERPRET_CONFIG = triton.Config({"TILE": 4096}, num_warps=4)

# One tile holds a whole group's channels (BLOCK_C = next_pow2(C/G) ≤ the smallest TILE).
MAX_CHANNELS_PER_GROUP = 1024
# Channels per program in the dγ/dβ reduction over the batch.
PARAM_GRAD_BLOCK = 128


def group_norm_config(block_c: int, hw_pow2: int) -> triton.Config:
    """The pinned configuration for a group of block_c x hw_pow2 (padded) elements: the smallest tile
    that holds the whole group, at most 4096 elements (8 warps) — larger groups loop over such tiles —
    and 8192 when a group has 256 or more channels, so a tile still spans ≥ 32 positions. Under the
    interpreter GN_INTERPRET_CONFIG, unless GPU configurations are asked for."""
    if not use_gpu_configs():
        return GN_INTERPRET_CONFIG
    if block_c >= 256:
        return GN_GPU_CONFIGS[3]
    group = block_c * hw_pow2
    return next((cfg for cfg in GN_GPU_CONFIGS[:3] if cfg.kwargs["TILE"] >= group), GN_GPU_CONFIGS[2])


def _block_sizes(c: int, hw: int, num_groups: int) -> tuple[int, int, int]:
    cpg = c // num_groups
    return cpg, triton.next_power_of_2(cpg), triton.next_power_of_2(hw)


@torch.library.custom_op(f"{OP_NAMESPACE}::group_norm_film_silu_fwd", mutates_args=())
def _gn_fwd_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], eps: float,
               silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, C, H, W] -> (y [N, C, H, W] in x's dtype, mean [N, G] fp32, rstd [N, G] fp32)."""
    n, c, h, w = x.shape
    x = x.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    has_film = scale is not None
    if has_film:
        scale, shift = scale.contiguous(), shift.contiguous()
    y = new_buffer((n, c, h, w), x.dtype, x.device)
    mean = new_buffer((n, num_groups), torch.float32, x.device)
    rstd = new_buffer((n, num_groups), torch.float32, x.device)
    cpg, block_c, hw_pow2 = _block_sizes(c, h * w, num_groups)
    grid = check_grid("group_norm_film_silu", (n * num_groups,))
    with device_guard(x):
        gn_forward_kernel[grid](
            x, y, weight, bias, scale if has_film else x, shift if has_film else x, mean, rstd,
            c, h * w, cpg, num_groups, eps,
            HAS_FILM=has_film, SILU=silu, BLOCK_C=block_c, HW_POW2=hw_pow2,
            **launch_options(group_norm_config(block_c, hw_pow2)))
    return y, mean, rstd


@_gn_fwd_op.register_fake
def _(x, num_groups, weight, bias, scale, shift, eps, silu):
    n = x.shape[0]
    return (x.new_empty(x.shape),
            x.new_empty((n, num_groups), dtype=torch.float32),
            x.new_empty((n, num_groups), dtype=torch.float32))


@torch.library.custom_op(f"{OP_NAMESPACE}::group_norm_film_silu_bwd", mutates_args=())
def _gn_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mean: torch.Tensor,
               rstd: torch.Tensor, num_groups: int, silu: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [N,C,H,W], dγ [C], dβ [C], dscale [N,C], dshift [N,C]); without FiLM the last two are
    empty (0-element) tensors."""
    n, c, h, w = x.shape
    x, dy = x.contiguous(), dy.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    has_film = scale is not None
    if has_film:
        scale, shift = scale.contiguous(), shift.contiguous()
        dscale = new_buffer((n, c), scale.dtype, x.device)
        dshift = new_buffer((n, c), shift.dtype, x.device)
    else:
        dscale = x.new_empty((0,))
        dshift = x.new_empty((0,))
    dx = new_buffer((n, c, h, w), x.dtype, x.device)
    dw_part = new_buffer((n, c), torch.float32, x.device)
    db_part = new_buffer((n, c), torch.float32, x.device)
    dweight = new_buffer((c,), weight.dtype, x.device)
    dbias = new_buffer((c,), bias.dtype, x.device)
    cpg, block_c, hw_pow2 = _block_sizes(c, h * w, num_groups)
    grid = check_grid("group_norm_film_silu", (n * num_groups,))
    with device_guard(x):
        gn_backward_kernel[grid](
            x, dy, dx, weight, bias, scale if has_film else x, shift if has_film else x, mean, rstd,
            dscale if has_film else dx, dshift if has_film else dx, dw_part, db_part,
            c, h * w, cpg, num_groups, 1.0 / (cpg * h * w),
            HAS_FILM=has_film, SILU=silu, BLOCK_C=block_c, HW_POW2=hw_pow2,
            **launch_options(group_norm_config(block_c, hw_pow2)))
        gn_param_grad_kernel[(triton.cdiv(c, PARAM_GRAD_BLOCK),)](
            dw_part, db_part, dweight, dbias, n, c, BLOCK=PARAM_GRAD_BLOCK)
    return dx, dweight, dbias, dscale, dshift


@_gn_bwd_op.register_fake
def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu):
    n, c = x.shape[:2]
    film_shape = (n, c) if scale is not None else (0,)
    return (x.new_empty(x.shape),
            weight.new_empty((c,)), bias.new_empty((c,)),
            (scale if scale is not None else x).new_empty(film_shape),
            (shift if shift is not None else x).new_empty(film_shape))


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups = num_groups
    ctx.silu = silu


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dscale, dshift = _gn_bwd_op(dy, x, weight, bias, scale, shift, mean, rstd,
                                                    ctx.num_groups, ctx.silu)
    if scale is None:
        dscale = dshift = None
    return dx, None, dweight, dbias, dscale, dshift, None, None


_gn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_film_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                         scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                         eps: float = 1e-5, silu: bool = True) -> torch.Tensor:
    """y = act(GN(x; γ, β)·(1 + scale) + shift), fused; same contract as the reference.

    x: [N x C x H x W] fp32/fp16/bf16 (any strides; read through a contiguous copy when needed).
    weight γ, bias β: [C].  scale, shift: [N x C] or None.  Statistics in fp32; y has x's dtype.
    """
    given = [t for t in (x, weight, bias, scale, shift) if t is not None]
    check_dtype("group_norm_film_silu", *given)
    check_group_norm_args(x, num_groups, weight, bias, scale, shift)
    check_device("group_norm_film_silu", *given)
    if any(t.device != x.device for t in given):
        raise ValueError("group_norm_film_silu: x, weight, bias, scale and shift must be on one device")
    if x.shape[1] // num_groups > MAX_CHANNELS_PER_GROUP:
        raise ValueError(f"group_norm_film_silu: at most {MAX_CHANNELS_PER_GROUP} channels per group, "
                         f"got {x.shape[1] // num_groups}")
    if not eps > 0:
        raise ValueError(f"group_norm_film_silu: eps must be positive, got {eps}")
    if x.numel() == 0:
        raise ValueError(f"group_norm_film_silu: x is empty, shape {tuple(x.shape)}")
    # The kernels take both FiLM terms or neither; a missing one is its identity (0).
    if scale is None and shift is not None:
        scale = torch.zeros_like(shift)
    elif shift is None and scale is not None:
        shift = torch.zeros_like(scale)
    y, _, _ = _gn_fwd_op(x, int(num_groups), weight, bias, scale, shift, float(eps), bool(silu))
    return y
