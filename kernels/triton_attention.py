"""Flash attention softmax(q kᵀ/√d) v as a torch.library custom op with Triton forward and backward.

`attention` has the signature of `kernels.reference.attention`; kernels and math are in
kernels/_triton_attention_kernels.py and kernels/README.md. Two custom ops carry it:
`ddpm_kernels::flash_attention_fwd` (returns O and the fp32 base-2 log-sum-exp of each row) and
`ddpm_kernels::flash_attention_bwd` (returns dq, dk, dv), tied together with register_autograd, each
with a fake (meta) implementation so torch.compile traces through them.

No `from __future__ import annotations` here: torch.library infers the op schemas from the annotations.
"""
import torch
import triton

from kernels._triton_attention_kernels import (attn_backward_dkdv_kernel, attn_backward_dq_kernel,
                                               attn_backward_preprocess_kernel, attn_forward_kernel)
from kernels._triton_common import (INTERPRET, OP_NAMESPACE, check_device, check_dtype, device_guard,
                                    dot_precision, new_buffer, upcast_dots)
from kernels.reference import check_attention_args

__all__ = ["attention", "SUPPORTED_HEAD_DIMS", "ATTN_FWD_GPU_CONFIGS", "ATTN_DKDV_GPU_CONFIGS",
           "ATTN_DQ_GPU_CONFIGS", "ATTN_FWD_FP32_CONFIGS", "ATTN_DKDV_FP32_CONFIGS", "ATTN_DQ_FP32_CONFIGS",
           "ATTN_INTERPRET_CONFIG", "PREPROCESS_BLOCK_M"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Autotuned on a GPU (query block, key block, warps, pipeline stages); every block is ≥ 16 because
# tl.dot needs each dimension ≥ 16 on tensor cores, and a power of two. Half-precision inputs use
# tensor-core tiles; fp32 inputs get true fp32 products ("ieee", no TF32), which run on FMA units and
# need small tiles to stay in registers (kernels/README.md has the compiled figures).
ATTN_FWD_GPU_CONFIGS = [_config(64, 64, 4, 2), _config(64, 32, 4, 3), _config(128, 64, 8, 2),
                        _config(128, 32, 4, 3)]
ATTN_DKDV_GPU_CONFIGS = [_config(32, 64, 4, 2), _config(64, 64, 4, 2), _config(32, 128, 8, 2)]
ATTN_DQ_GPU_CONFIGS = [_config(64, 32, 4, 2), _config(64, 64, 4, 2), _config(128, 32, 8, 2)]
ATTN_FWD_FP32_CONFIGS = [_config(32, 32, 8, 1)]
ATTN_DKDV_FP32_CONFIGS = [_config(32, 32, 8, 1)]
ATTN_DQ_FP32_CONFIGS = [_config(32, 32, 8, 1)]
# The interpreter cannot time configs. 32 x 32 blocks make even L = 49 span two blocks, so the tests
# exercise the online-softmax rescaling and the masking of a partial block.
ATTN_INTERPRET_CONFIG = _config(32, 32, 4, 1)
# Rows per program of the elementwise D_i = Σ dO·O kernel.
PREPROCESS_BLOCK_M = 64

_KEY = ["L", "HEAD_DIM", "UPCAST", "PRECISION"]


def _tuned(kernel, half_configs, fp32_configs):
    if INTERPRET:
        return triton.autotune(configs=[ATTN_INTERPRET_CONFIG], key=_KEY)(kernel)

    def by_precision(configs, named_args, **meta):
        """fp32 ("ieee") launches try only the fp32 list, half-precision launches only theirs."""
        wanted = fp32_configs if meta["PRECISION"] == "ieee" else half_configs
        return [c for c in configs if any(c is w for w in wanted)]

    return triton.autotune(configs=half_configs + fp32_configs, key=_KEY,
                           prune_configs_by={"early_config_prune": by_precision})(kernel)


_attn_fwd = _tuned(attn_forward_kernel, ATTN_FWD_GPU_CONFIGS, ATTN_FWD_FP32_CONFIGS)
_attn_dkdv = _tuned(attn_backward_dkdv_kernel, ATTN_DKDV_GPU_CONFIGS, ATTN_DKDV_FP32_CONFIGS)
_attn_dq = _tuned(attn_backward_dq_kernel, ATTN_DQ_GPU_CONFIGS, ATTN_DQ_FP32_CONFIGS)


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
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), z * h)  # noqa: E731
    with device_guard(q):
        _attn_fwd[grid](q, k, v, o, lse2, *_strides(q), *_strides(k), *_strides(v), h, seq, d ** -0.5,
                        **_meta_args(q))
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
    with device_guard(q):
        attn_backward_preprocess_kernel[(triton.cdiv(rows, PREPROCESS_BLOCK_M),)](
            o, do, delta, rows, HEAD_DIM=d, BLOCK_M=PREPROCESS_BLOCK_M)
        _attn_dkdv[lambda meta: (triton.cdiv(seq, meta["BLOCK_N"]), z * h)](
            q, k, v, do, dk, dv, lse2, delta, *strides, h, seq, d ** -0.5, **_meta_args(q))
        _attn_dq[lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), z * h)](
            q, k, v, do, dq, lse2, delta, *strides, h, seq, d ** -0.5, **_meta_args(q))
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
