"""Eager PyTorch attention with the L x L score matrix materialised: the ground truth of
kernels/flash_attention/op.py and the U-Net's path when fused kernels are off. The argument checks
here are shared with the fused op."""
from __future__ import annotations

import torch


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be N x heads x L x d, got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have the same shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device} and {v.device}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v with the L x L score matrix materialised; the softmax runs in fp32.

    q, k, v: [N x heads x L x d] (L = H·W spatial positions).  Returns [N x heads x L x d] in q's dtype.
    """
    check_attention_args(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (N, nh, L, L)
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    return torch.matmul(weights, v)
