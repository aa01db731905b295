"""Eager PyTorch GroupNorm + FiLM + SiLU: the ground truth of kernels/group_norm/op.py and the U-Net's
path when fused kernels are off. The argument checks here are shared with the fused op."""
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
