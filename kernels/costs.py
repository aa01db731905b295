"""Byte and FLOP counts of the fused Triton ops, for benchmarks (GB/s = bytes / s, TFLOP/s = FLOPs / s).

Plain arithmetic on shapes (no Triton import); kernels/README.md derives each formula.
"""
from __future__ import annotations

FP32_BYTES = 4


def group_norm_bytes(shape: tuple[int, int, int, int], num_groups: int, elem_bytes: int,
                     param_bytes: int = FP32_BYTES, film: bool = True, backward: bool = False) -> int:
    """Ideal DRAM traffic of GroupNorm+FiLM+SiLU: each big tensor moved once.

    forward:  x read, y written (2·NCHW·e) + γ, β + scale, shift + saved mean, rstd (fp32).
    backward: x and dy read, dx written (3·NCHW·e) + γ, β, dγ, dβ + scale, shift, dscale, dshift
              + mean, rstd + the fp32 [N, C] partial sums of dγ and dβ (written, then read).
    """
    n, c, h, w = shape
    numel = n * c * h * w
    stats = 2 * n * num_groups * FP32_BYTES
    if not backward:
        return 2 * numel * elem_bytes + 2 * c * param_bytes + (2 * n * c * elem_bytes if film else 0) + stats
    partials = 2 * 2 * n * c * FP32_BYTES
    return (3 * numel * elem_bytes + 4 * c * param_bytes + (4 * n * c * elem_bytes if film else 0)
            + stats + partials)


def attention_flops(n: int, heads: int, seq_len: int, head_dim: int, backward: bool = False,
                    executed: bool = False) -> int:
    """FLOPs of softmax(q kᵀ/√d) v (2 per multiply-add; softmax's exponentials not counted).

    forward: Q·Kᵀ and P·V = 4·N·heads·L²·d. backward: the usual 2.5 × forward (dV, dP, dQ, dK plus the
    recomputed Q·Kᵀ: 10·N·heads·L²·d), or with executed=True what these kernels run, 14·N·heads·L²·d
    (the dK/dV and dQ kernels each recompute Q·Kᵀ, and both compute dP).
    """
    unit = n * heads * seq_len * seq_len * head_dim
    if not backward:
        return 4 * unit
    return (14 if executed else 10) * unit


def attention_bytes(n: int, heads: int, seq_len: int, head_dim: int, elem_bytes: int) -> int:
    """Minimum forward traffic: q, k, v read and O written once, plus the fp32 log-sum-exp per row."""
    return 4 * n * heads * seq_len * head_dim * elem_bytes + n * heads * seq_len * FP32_BYTES
