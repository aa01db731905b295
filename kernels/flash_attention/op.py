"""Flash attention softmax(q kᵀ/√d) v as a torch.library custom op with Triton forward and backward.

`attention` has the signature of the eager reference (kernels/flash_attention/reference.py); kernels and
math are in kernels/flash_attention/kernel.py and kernels/README.md. Two custom ops carry it:
`diffusion_kernels::flash_attention_fwd` (returns O and the fp32 base-2 log-sum-exp of each row) and
`diffusion_kernels::flash_attention_bwd` (returns dq, dk, dv), tied together with register_autograd, each
with a fake (meta) implementation so torch.compile traces through them.

No `from __future__ import annotations` here: torch.library infers the op schemas from the annotations.
"""
import torch
import triton

from kernels.flash_attention import SUPPORTED_HEAD_DIMS
from kernels.flash_attention.kernel import (attn_backward_dkdv_kernel, attn_backward_dq_kernel,
                                            attn_backward_preprocess_kernel, attn_forward_kernel)
from kernels.flash_attention.reference import check_attention_args
from kernels.triton_common import (OP_NAMESPACE, check_device, check_dtype, check_grid, device_guard,
                                   dot_precision, launch_options, new_buffer, upcast_dots, use_gpu_configs)

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


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _meta_args(q: torch.Tensor) -> dict:
    return dict(HEAD_DIM=q.shape[-1], UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype))


@torch.library.custom_op(f"{OP_NAMESPACE}::flash_attention_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [Z, H, L, D] -> (O [Z, H, L, D] contiguous, LSE2 [Z·H, L] fp32)."""
    z, h, seq, d = q.shape
    q, k, v = _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v)
    o = new_buffer((z, h, seq, d), q.dtype, q.device)
    lse2 = new_buffer((z * h, seq), torch.float32, q.device)
    config, _, _ = attention_configs(q.dtype, d)
    grid = attention_grid(z * h, seq, config.kwargs["BLOCK_M"])
    with device_guard(q):
        attn_forward_kernel[grid](q, k, v, o, lse2, *_strides(q), *_strides(k), *_strides(v), h, seq,
                                  d ** -0.5, **_meta_args(q), **launch_options(config))
    return o, lse2


@_attn_fwd_op.register_fake
def _(q, k, v):
    z, h, seq, d = q.shape
    return (q.new_empty((z, h, seq, d)), q.new_empty((z * h, seq), dtype=torch.float32))


@torch.library.custom_op(f"{OP_NAMESPACE}::flash_attention_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each [Z, H, L, D] contiguous in q's dtype."""
    z, h, seq, d = q.shape
    q, k, v = _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v)
    do, o = do.contiguous(), o.contiguous()
    delta = new_buffer((z * h, seq), torch.float32, q.device)
    dq = new_buffer((z, h, seq, d), q.dtype, q.device)
    dk = new_buffer((z, h, seq, d), q.dtype, q.device)
    dv = new_buffer((z, h, seq, d), q.dtype, q.device)
    rows = z * h * seq
    strides = (*_strides(q), *_strides(k), *_strides(v))
    _, dkdv_config, dq_config = attention_configs(q.dtype, d)
    with device_guard(q):
        attn_backward_preprocess_kernel[check_grid("attention", (triton.cdiv(rows, PREPROCESS_BLOCK_M),))](
            o, do, delta, rows, HEAD_DIM=d, BLOCK_M=PREPROCESS_BLOCK_M)
        attn_backward_dkdv_kernel[attention_grid(z * h, seq, dkdv_config.kwargs["BLOCK_N"])](
            q, k, v, do, dk, dv, lse2, delta, *strides, h, seq, d ** -0.5, **_meta_args(q),
            **launch_options(dkdv_config))
        attn_backward_dq_kernel[attention_grid(z * h, seq, dq_config.kwargs["BLOCK_M"])](
            q, k, v, do, dq, lse2, delta, *strides, h, seq, d ** -0.5, **_meta_args(q),
            **launch_options(dq_config))
    return dq, dk, dv


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse2):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    o, lse2 = output
    ctx.save_for_backward(q, k, v, o, lse2)


def _backward(ctx, do, _dlse2):
    q, k, v, o, lse2 = ctx.saved_tensors
    return _attn_bwd_op(do, q, k, v, o, lse2)


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v, flash-attention style (no L x L matrix in memory); softmax in fp32.

    q, k, v: [N x heads x L x d], one dtype (fp32/fp16/bf16), one device, any strides; any L ≥ 1 and
    d in SUPPORTED_HEAD_DIMS.  Returns [N x heads x L x d] (contiguous) in q's dtype.
    """
    check_dtype("attention", q, k, v)
    check_attention_args(q, k, v)
    check_device("attention", q, k, v)
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim d must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if q.numel() == 0:
        raise ValueError(f"attention: q is empty, shape {tuple(q.shape)}")
    o, _ = _attn_fwd_op(q, k, v)
    return o
