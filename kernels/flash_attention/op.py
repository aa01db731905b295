"""Flash attention softmax(q kᵀ/√d) v: the Triton launches, an eager autograd path, and torch.library ops.

`attention` has the signature of the eager reference (kernels/flash_attention/reference.py); kernels and
math are in kernels/flash_attention/kernel.py and kernels/README.md. One launch function per direction
(`_forward`, `_backward`) is reached by two paths:

- eager: `_FlashAttention`, a plain torch.autograd.Function (or `_forward` alone when no input needs a
  gradient), so a call pays no dispatcher cost (kernels/host_cost.py measures what it does pay);
- torch.compile (`torch.compiler.is_compiling()`): the custom ops `diffusion_kernels::flash_attention_fwd`
  (O and the fp32 base-2 log-sum-exp of each row) and `diffusion_kernels::flash_attention_bwd`
  (dq, dk, dv), tied together with register_autograd, each with a fake (meta) implementation so
  torch.compile traces through them.

No `from __future__ import annotations` here: torch.library infers the op schemas from the annotations.
"""
import functools
from typing import NamedTuple

import torch
import triton

from kernels.flash_attention import SUPPORTED_HEAD_DIMS
from kernels.flash_attention.kernel import (attn_backward_dkdv_kernel, attn_backward_dq_kernel,
                                            attn_backward_preprocess_kernel, attn_forward_kernel)
from kernels.flash_attention.reference import check_attention_args
from kernels.triton_common import (OP_NAMESPACE, SUPPORTED_DTYPES, check_device, check_dtype, check_grid,
                                   device_guard, dot_precision, launch_options, new_buffer, runs_here,
                                   upcast_dots, use_gpu_configs)

__all__ = ["attention", "attention_configs", "attention_grid", "SUPPORTED_HEAD_DIMS", "ATTN_FWD_GPU_CONFIGS",
           "ATTN_DKDV_GPU_CONFIGS", "ATTN_DQ_GPU_CONFIGS", "ATTN_FWD_FP32_CONFIGS", "ATTN_DKDV_FP32_CONFIGS",
           "ATTN_DQ_FP32_CONFIGS", "ATTN_INTERPRET_CONFIG", "PREPROCESS_BLOCK_M"]


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# The GPU configurations (query block, key block, warps, pipeline stages); every block is ≥ 16 because
# tl.dot needs each dimension ≥ 16 on tensor cores, and a power of two. Half-precision inputs use
# tensor-core tiles; fp32 inputs get true fp32 products ("ieee", no TF32), which run on FMA units and
# need small tiles to stay in registers. compile_check.py compiles every entry of these lists;
# `attention_configs` pins the one each launch uses (kernels/README.md has the compiled figures).
ATTN_FWD_GPU_CONFIGS = [_config(64, 64, 4, 2), _config(64, 32, 4, 3), _config(128, 64, 8, 2),
                        _config(128, 32, 4, 3)]
ATTN_DKDV_GPU_CONFIGS = [_config(32, 64, 4, 2), _config(64, 64, 4, 2), _config(32, 128, 8, 2)]
ATTN_DQ_GPU_CONFIGS = [_config(64, 32, 4, 2), _config(64, 64, 4, 2), _config(128, 32, 8, 2)]
ATTN_FWD_FP32_CONFIGS = [_config(32, 32, 8, 1)]
ATTN_DKDV_FP32_CONFIGS = [_config(32, 32, 8, 1)]
ATTN_DQ_FP32_CONFIGS = [_config(32, 32, 8, 1)]
# The interpreter's tiles: 32 x 32 blocks make even L = 49 span two blocks, so the tests exercise the
# online-softmax rescaling and the masking of a partial block while NumPy stays fast.
ATTN_INTERPRET_CONFIG = _config(32, 32, 4, 1)
# Rows per program of the elementwise D_i = Σ dO·O kernel.
PREPROCESS_BLOCK_M = 64


def attention_configs(dtype: torch.dtype, head_dim: int) -> tuple[triton.Config, triton.Config, triton.Config]:
    """The pinned (forward, dK/dV, dQ) configurations for this dtype and head dim.

    Half precision: 64 x 64 query x key blocks (128 x 64 with 8 warps at d = 128, where a 64-row block
    leaves the tensor cores half idle), 32 x 64 for dK/dV and 64 x 32 for dQ, the tiles that compile
    without register spills at every head dim but d = 128 (kernels/README.md). fp32: the one fp32 tile.
    Under the interpreter, ATTN_INTERPRET_CONFIG unless GPU configurations are asked for.
    """
    if not use_gpu_configs():
        return ATTN_INTERPRET_CONFIG, ATTN_INTERPRET_CONFIG, ATTN_INTERPRET_CONFIG
    if dtype == torch.float32:
        return ATTN_FWD_FP32_CONFIGS[0], ATTN_DKDV_FP32_CONFIGS[0], ATTN_DQ_FP32_CONFIGS[0]
    forward = ATTN_FWD_GPU_CONFIGS[2] if head_dim == 128 else ATTN_FWD_GPU_CONFIGS[0]
    return forward, ATTN_DKDV_GPU_CONFIGS[0], ATTN_DQ_GPU_CONFIGS[0]


def attention_grid(batch_heads: int, seq_len: int, block: int) -> tuple[int]:
    """One program per (batch·head, block of `block` rows), all on grid axis 0 (limit 2^31 − 1).

    The kernels split the program id back into (batch·head, block), blocks of one head adjacent, so
    programs that run together share that head's K and V in L2. (Batch·heads on axis 1 would cap it
    at 65,535: guided sampling of an 8,192 batch with 8 heads is already past that.)
    """
    return check_grid("attention", (batch_heads * triton.cdiv(seq_len, block),))


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume stride 1 along d (vector loads); other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _Launch(NamedTuple):
    """Everything the launches need that depends only on (Z, H, L, d, dtype) and the configuration."""
    forward_grid: tuple
    preprocess_grid: tuple
    dkdv_grid: tuple
    dq_grid: tuple
    forward_meta: dict    # HEAD_DIM, UPCAST, PRECISION and the pinned forward configuration
    dkdv_meta: dict
    dq_meta: dict
    sm_scale: float       # 1/√d


@functools.lru_cache(maxsize=1024)
def _launch(z: int, h: int, seq: int, d: int, dtype: torch.dtype, gpu_configs: bool) -> _Launch:
    """The launches of a shape, computed once per shape (`gpu_configs` is part of the key because
    attention_configs reads it)."""
    forward, dkdv, dq = attention_configs(dtype, d)
    common = dict(HEAD_DIM=d, UPCAST=upcast_dots(dtype), PRECISION=dot_precision(dtype))
    rows = z * h * seq
    return _Launch(attention_grid(z * h, seq, forward.kwargs["BLOCK_M"]),
                   check_grid("attention", (triton.cdiv(rows, PREPROCESS_BLOCK_M),)),
                   attention_grid(z * h, seq, dkdv.kwargs["BLOCK_N"]),
                   attention_grid(z * h, seq, dq.kwargs["BLOCK_M"]),
                   dict(common, **launch_options(forward)), dict(common, **launch_options(dkdv)),
                   dict(common, **launch_options(dq)), d ** -0.5)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Launches attn_forward_kernel. q, k, v [Z, H, L, D], any strides.
    Returns (O [Z, H, L, D] contiguous in q's dtype, LSE2 [Z·H, L] fp32)."""
    (sqz, sqh, sql, sqd), (skz, skh, skl, skd), (svz, svh, svl, svd) = q.stride(), k.stride(), v.stride()
    if sqd != 1 or skd != 1 or svd != 1:
        return _forward(_unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v))
    z, h, seq, d = q.shape
    launch = _launch(z, h, seq, d, q.dtype, use_gpu_configs())
    o = new_buffer((z, h, seq, d), q.dtype, q.device)
    lse2 = new_buffer((z * h, seq), torch.float32, q.device)
    with device_guard(q):
        attn_forward_kernel[launch.forward_grid](q, k, v, o, lse2, sqz, sqh, sql, skz, skh, skl, svz, svh, svl,
                                                 h, seq, launch.sm_scale, **launch.forward_meta)
    return o, lse2


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse2: torch.Tensor):
    """Launches the D_i = Σ dO·O, dK/dV and dQ kernels. Returns (dq, dk, dv), each [Z, H, L, D]
    contiguous in q's dtype."""
    q, k, v = _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v)
    do, o = do.contiguous(), o.contiguous()
    z, h, seq, d = q.shape
    launch = _launch(z, h, seq, d, q.dtype, use_gpu_configs())
    delta = new_buffer((z * h, seq), torch.float32, q.device)
    dq = new_buffer((z, h, seq, d), q.dtype, q.device)
    dk = new_buffer((z, h, seq, d), q.dtype, q.device)
    dv = new_buffer((z, h, seq, d), q.dtype, q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    with device_guard(q):
        attn_backward_preprocess_kernel[launch.preprocess_grid](
            o, do, delta, z * h * seq, HEAD_DIM=d, BLOCK_M=PREPROCESS_BLOCK_M)
        attn_backward_dkdv_kernel[launch.dkdv_grid](
            q, k, v, do, dk, dv, lse2, delta, *strides, h, seq, launch.sm_scale, **launch.dkdv_meta)
        attn_backward_dq_kernel[launch.dq_grid](
            q, k, v, do, dq, lse2, delta, *strides, h, seq, launch.sm_scale, **launch.dq_meta)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """The eager path: the launches behind a plain autograd.Function."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, lse2 = _forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse2)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        return _backward(do, *ctx.saved_tensors)


@torch.library.custom_op(f"{OP_NAMESPACE}::flash_attention_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [Z, H, L, D] -> (O [Z, H, L, D] contiguous, LSE2 [Z·H, L] fp32)."""
    return _forward(q, k, v)


@_attn_fwd_op.register_fake
def _(q, k, v):
    z, h, seq, d = q.shape
    return (q.new_empty((z, h, seq, d)), q.new_empty((z * h, seq), dtype=torch.float32))


@torch.library.custom_op(f"{OP_NAMESPACE}::flash_attention_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each [Z, H, L, D] contiguous in q's dtype."""
    return _backward(do, q, k, v, o, lse2)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse2):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    o, lse2 = output
    ctx.save_for_backward(q, k, v, o, lse2)


def _op_backward(ctx, do, _dlse2):
    q, k, v, o, lse2 = ctx.saved_tensors
    return _attn_bwd_op(do, q, k, v, o, lse2)


_attn_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


def _check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The entry checks, each a direct comparison; the shared check functions run only when one fails,
    to raise their message (in the order: dtypes, shapes and agreement, devices, then the head dim)."""
    if not (q.dtype in SUPPORTED_DTYPES and k.dtype in SUPPORTED_DTYPES and v.dtype in SUPPORTED_DTYPES):
        check_dtype("attention", q, k, v)
    shape, device = q.shape, q.device
    if not (len(shape) == 4 and k.shape == shape and v.shape == shape and k.dtype == q.dtype
            and v.dtype == q.dtype and k.device == device and v.device == device):
        check_attention_args(q, k, v)
    if not runs_here(q):
        check_device("attention", q, k, v)
    if shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim d must be one of {SUPPORTED_HEAD_DIMS}, got {shape[-1]}")
    if q.numel() == 0:
        raise ValueError(f"attention: q is empty, shape {tuple(shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v, flash-attention style (no L x L matrix in memory); softmax in fp32.

    q, k, v: [N x heads x L x d], one dtype (fp32/fp16/bf16), one device, any strides; any L ≥ 1 and
    d in SUPPORTED_HEAD_DIMS.  Returns [N x heads x L x d] (contiguous) in q's dtype.
    """
    _check_args(q, k, v)
    if torch.compiler.is_compiling():
        return _attn_fwd_op(q, k, v)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v)
    return _forward(q, k, v)[0]
