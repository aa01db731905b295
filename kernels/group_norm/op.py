"""Fused GroupNorm + FiLM + SiLU: the Triton launches, an eager autograd path, and torch.library ops.

    y = act(GN(x; γ, β)·(1 + scale[:, :, None, None]) + shift[:, :, None, None])

`group_norm_film_silu` has the signature of the eager reference (kernels/group_norm/reference.py); the
kernels and their math are in kernels/group_norm/kernel.py and kernels/README.md. One launch function
per direction (`_forward`, `_backward`) is reached by two paths:

- eager: `_GroupNormFilmSiLU`, a plain torch.autograd.Function (or `_forward` alone when no input needs
  a gradient), so a call pays no dispatcher cost (kernels/host_cost.py measures what it does pay);
- torch.compile (`torch.compiler.is_compiling()`): the custom ops `diffusion_kernels::group_norm_film_silu_fwd`
  (y and the fp32 mean and rstd saved for backward) and `diffusion_kernels::group_norm_film_silu_bwd`
  (dx, dγ, dβ, dscale, dshift), tied together with register_autograd, each with a fake (meta)
  implementation so torch.compile traces through them.

No `from __future__ import annotations` here: torch.library infers the op schemas from the annotations.
"""
import functools
from typing import NamedTuple, Optional

import torch
import triton

from kernels.group_norm.kernel import gn_backward_kernel, gn_forward_kernel, gn_param_grad_kernel
from kernels.group_norm.reference import check_group_norm_args
from kernels.triton_common import (OP_NAMESPACE, SUPPORTED_DTYPES, check_device, check_dtype, check_grid,
                                   device_guard, launch_options, new_buffer, new_buffer_like, runs_here,
                                   use_gpu_configs)

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


class _Launch(NamedTuple):
    """Everything a launch needs that depends only on (N, C, H·W, G) and the configuration choice."""
    grid: tuple            # (N·G,): one program per (n, g)
    param_grid: tuple      # programs of the dγ/dβ reduction
    cpg: int               # channels per group
    inv_group_size: float  # 1 / M, M = (C/G)·H·W
    meta: dict             # BLOCK_C, HW_POW2, TILE, num_warps, num_stages


@functools.lru_cache(maxsize=1024)
def _launch(n: int, c: int, hw: int, num_groups: int, gpu_configs: bool) -> _Launch:
    """The launch of a shape, computed once per shape (`gpu_configs` is part of the key because
    group_norm_config reads it)."""
    cpg, block_c, hw_pow2 = _block_sizes(c, hw, num_groups)
    meta = dict(BLOCK_C=block_c, HW_POW2=hw_pow2, **launch_options(group_norm_config(block_c, hw_pow2)))
    return _Launch(check_grid("group_norm_film_silu", (n * num_groups,)),
                   (triton.cdiv(c, PARAM_GRAD_BLOCK),), cpg, 1.0 / (cpg * hw), meta)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: Optional[torch.Tensor],
             shift: Optional[torch.Tensor], settings: tuple, keep_stats: bool = True):
    """Launches gn_forward_kernel. x [N, C, H, W] (any strides), γ, β [C], scale and shift [N, C] or
    both None; settings (G, eps, silu). Returns (y [N, C, H, W] contiguous in x's dtype, mean [N, G]
    fp32, rstd [N, G] fp32); without keep_stats (nothing will run backward) mean and rstd share one
    scratch buffer, and neither holds its statistic."""
    num_groups, eps, silu = settings
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    n, c, h, w = x.shape
    launch = _launch(n, c, h * w, num_groups, use_gpu_configs())
    has_film = scale is not None
    if has_film:
        scale, shift = scale.contiguous(), shift.contiguous()
    else:
        scale = shift = x  # never read without FiLM
    y = new_buffer_like(x)
    mean = new_buffer((n, num_groups), torch.float32, x.device)
    rstd = new_buffer((n, num_groups), torch.float32, x.device) if keep_stats else mean
    with device_guard(x):
        gn_forward_kernel[launch.grid](
            x, y, weight, bias, scale, shift, mean, rstd, c, h * w, launch.cpg, num_groups, eps,
            HAS_FILM=has_film, SILU=silu, **launch.meta)
    return y, mean, rstd


def _backward(dy: torch.Tensor, saved: tuple, num_groups: int, silu: bool):
    """Launches gn_backward_kernel and gn_param_grad_kernel. saved: (x, γ, β, scale, shift, mean, rstd)
    as the forward took and returned them. Returns (dx [N, C, H, W], dγ [C], dβ [C], dscale [N, C],
    dshift [N, C]); dscale and dshift are None without FiLM."""
    x, weight, bias, scale, shift, mean, rstd = saved
    x, dy = x.contiguous(), dy.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    n, c, h, w = x.shape
    launch = _launch(n, c, h * w, num_groups, use_gpu_configs())
    has_film = scale is not None
    dx = new_buffer_like(x)
    if has_film:
        scale, shift = scale.contiguous(), shift.contiguous()
        dscale = new_buffer((n, c), scale.dtype, x.device)
        dshift = new_buffer((n, c), shift.dtype, x.device)
    else:
        scale = shift = dscale = dshift = x  # never read or written without FiLM
    dw_part = new_buffer((n, c), torch.float32, x.device)
    db_part = new_buffer((n, c), torch.float32, x.device)
    dweight = new_buffer((c,), weight.dtype, x.device)
    dbias = new_buffer((c,), bias.dtype, x.device)
    with device_guard(x):
        gn_backward_kernel[launch.grid](
            x, dy, dx, weight, bias, scale, shift, mean, rstd, dscale, dshift, dw_part, db_part,
            c, h * w, launch.cpg, num_groups, launch.inv_group_size,
            HAS_FILM=has_film, SILU=silu, **launch.meta)
        gn_param_grad_kernel[launch.param_grid](dw_part, db_part, dweight, dbias, n, c, BLOCK=PARAM_GRAD_BLOCK)
    return dx, dweight, dbias, (dscale if has_film else None), (dshift if has_film else None)


class _GroupNormFilmSiLU(torch.autograd.Function):
    """The eager path: the launches behind a plain autograd.Function. settings: (G, eps, silu)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, settings):
        y, mean, rstd = _forward(x, weight, bias, scale, shift, settings)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups, _, ctx.silu = settings
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        return *_backward(dy, ctx.saved_tensors, ctx.num_groups, ctx.silu), None


@torch.library.custom_op(f"{OP_NAMESPACE}::group_norm_film_silu_fwd", mutates_args=())
def _gn_fwd_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], eps: float,
               silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, C, H, W] -> (y [N, C, H, W] in x's dtype, mean [N, G] fp32, rstd [N, G] fp32)."""
    return _forward(x, weight, bias, scale, shift, (num_groups, eps, silu))


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
    dx, dweight, dbias, dscale, dshift = _backward(dy, (x, weight, bias, scale, shift, mean, rstd),
                                                   num_groups, silu)
    if dscale is None:
        dscale, dshift = x.new_empty((0,)), x.new_empty((0,))
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


def _op_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dscale, dshift = _gn_bwd_op(dy, x, weight, bias, scale, shift, mean, rstd,
                                                    ctx.num_groups, ctx.silu)
    if scale is None:
        dscale = dshift = None
    return dx, None, dweight, dbias, dscale, dshift, None, None


_gn_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


def _check_args(x, num_groups, weight, bias, scale, shift, eps) -> None:
    """The entry checks, each a direct comparison; the shared check functions run only when one fails,
    to raise their message (in the order: dtypes, shapes, devices, then this op's own limits)."""
    if not (x.dtype in SUPPORTED_DTYPES and weight.dtype in SUPPORTED_DTYPES and bias.dtype in SUPPORTED_DTYPES
            and (scale is None or scale.dtype in SUPPORTED_DTYPES)
            and (shift is None or shift.dtype in SUPPORTED_DTYPES)):
        check_dtype("group_norm_film_silu", *_given(x, weight, bias, scale, shift))
    shape = x.shape
    if len(shape) != 4:
        check_group_norm_args(x, num_groups, weight, bias, scale, shift)
    n, c = shape[0], shape[1]
    if not (num_groups >= 1 and c % num_groups == 0 and weight.shape == (c,) and bias.shape == (c,)
            and (scale is None or scale.shape == (n, c)) and (shift is None or shift.shape == (n, c))):
        check_group_norm_args(x, num_groups, weight, bias, scale, shift)
    device = x.device
    if not (runs_here(x) and weight.device == device and bias.device == device
            and (scale is None or scale.device == device) and (shift is None or shift.device == device)):
        check_device("group_norm_film_silu", *_given(x, weight, bias, scale, shift))
        raise ValueError("group_norm_film_silu: x, weight, bias, scale and shift must be on one device")
    if c // num_groups > MAX_CHANNELS_PER_GROUP:
        raise ValueError(f"group_norm_film_silu: at most {MAX_CHANNELS_PER_GROUP} channels per group, "
                         f"got {c // num_groups}")
    if not eps > 0:
        raise ValueError(f"group_norm_film_silu: eps must be positive, got {eps}")
    if x.numel() == 0:
        raise ValueError(f"group_norm_film_silu: x is empty, shape {tuple(shape)}")


def _given(*tensors):
    return [t for t in tensors if t is not None]


def group_norm_film_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                         scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                         eps: float = 1e-5, silu: bool = True) -> torch.Tensor:
    """y = act(GN(x; γ, β)·(1 + scale) + shift), fused; same contract as the reference.

    x: [N x C x H x W] fp32/fp16/bf16 (any strides; read through a contiguous copy when needed).
    weight γ, bias β: [C].  scale, shift: [N x C] or None.  Statistics in fp32; y has x's dtype.
    """
    _check_args(x, num_groups, weight, bias, scale, shift, eps)
    # The kernels take both FiLM terms or neither; a missing one is its identity (0).
    if scale is None and shift is not None:
        scale = torch.zeros_like(shift)
    elif shift is None and scale is not None:
        shift = torch.zeros_like(scale)
    num_groups, eps, silu = int(num_groups), float(eps), bool(silu)
    if torch.compiler.is_compiling():
        return _gn_fwd_op(x, num_groups, weight, bias, scale, shift, eps, silu)[0]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad
                                    or (scale is not None and (scale.requires_grad or shift.requires_grad))):
        return _GroupNormFilmSiLU.apply(x, weight, bias, scale, shift, (num_groups, eps, silu))
    return _forward(x, weight, bias, scale, shift, (num_groups, eps, silu), keep_stats=False)[0]
