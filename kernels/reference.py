"""Eager PyTorch references for the fused kernels: the ground truth they are tested against.

These are also what the U-Net runs when fused kernels are off. Each has exactly the signature of its
fused counterpart (`kernels.group_norm_film_silu`, `kernels.attention`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_group_norm_args(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                          scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """Shape checks shared by the reference and the fused op, each failing with one clear message."""
    if x.ndim != 4:
        raise ValueError(f"x must be N x C x H x W, got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if num_groups < 1 or c % num_groups != 0:
        raise ValueError(f"GroupNorm: {c} channels are not divisible into {num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p.shape != (c,):
            raise ValueError(f"GroupNorm {name} must have shape ({c},), got {tuple(p.shape)}")
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and p.shape != (n, c):
            raise ValueError(f"FiLM {name} must have shape ({n}, {c}), got {tuple(p.shape)}")


def group_norm_film_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                         scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                         eps: float = 1e-5, silu: bool = True) -> torch.Tensor:
    """y = act(GN(x; γ, β) · (1 + scale) + shift), the U-Net's normalise-modulate-activate step.

    x: [N x C x H x W].  weight γ, bias β: [C].  scale, shift: [N x C] FiLM terms from the time (and
    class) embedding, or None (a block's first norm has no FiLM).  act is SiLU when `silu`, else identity.
    GroupNorm computes its statistics in fp32 for half inputs; the result keeps x's dtype.
    """
    check_group_norm_args(x, num_groups, weight, bias, scale, shift)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (1 + scale[:, :, None, None])
    if shift is not None:
        y = y + shift[:, :, None, None]
    return F.silu(y) if silu else y


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
