"""Classifier-free guidance (Ho & Salimans 2022): the guided noise prediction and its batched forward.

    ε̃(x_t, y) = ε_θ(x_t, ∅) + w · (ε_θ(x_t, y) − ε_θ(x_t, ∅))        (Ho & Salimans 2022, Eq. 6,
                                                                     written with w = 1 + their w)

w = 0 is the unconditional model, w = 1 the plain conditional model, w > 1 pushes samples towards
what makes the class recognisable (at some cost in diversity). ∅ is the learned null class
(`model.null_class`) the network saw for a fraction of training examples.
"""
from __future__ import annotations

from typing import Sequence

import torch

from shared.errors import UserError
from shared.model.precision import autocast

# Guidance scales above this are refused: past it samples saturate, and it bounds what the API accepts.
MAX_GUIDANCE = 20.0


def check_labels(labels: torch.Tensor | Sequence[int] | None, n: int, num_classes: int) -> torch.Tensor | None:
    """Labels as a LongTensor [n] in [0, num_classes); None stays None (unconditional sampling)."""
    if labels is None:
        return None
    if num_classes < 1:
        raise UserError("this model is unconditional (num_classes=0): it takes no class labels")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() != n:
        raise UserError(f"{labels.numel()} labels given for {n} samples")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes - 1}], got "
                        f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε̃ = ε_u + w·(ε_c − ε_u) for [N x C x H x W] predictions."""
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"eps_cond {tuple(eps_cond.shape)} and eps_uncond {tuple(eps_uncond.shape)} differ")
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def model_eps(model: torch.nn.Module, x_t: torch.Tensor, t: int | torch.Tensor, labels: torch.Tensor | None,
              guidance_scale: float = 1.0, precision: str = "fp32"):
    """Runs ε_θ for one sampler step, with both guidance passes batched into one forward.

    x_t: [N x C x H x W]; t: one int for the batch, or an int64 tensor [N] on x_t's device (what a
    captured CUDA graph reads); labels: LongTensor [N] or None.
    Returns (eps, eps_uncond), float32 like x_t: eps_uncond is None when one pass gives ε̃ exactly —
    an unconditional model or no labels (ε_θ(x, ∅)), w = 1 (ε_c alone) or w = 0 (ε_u alone) — and
    otherwise the caller combines with `cfg_combine(eps, eps_uncond, w)` (or hands both to a fused step).
    """
    n = x_t.shape[0]
    # From a Python int: a fill, not a host-to-device copy (no wait on the device per step).
    t_batch = t if torch.is_tensor(t) else torch.full((n,), int(t), dtype=torch.long, device=x_t.device)
    with torch.no_grad(), autocast(x_t.device, precision):
        if labels is None or getattr(model, "num_classes", 0) == 0:
            return model(x_t, t_batch).to(x_t.dtype), None
        if guidance_scale == 1.0:
            return model(x_t, t_batch, labels).to(x_t.dtype), None
        null = torch.full_like(labels, model.null_class)
        if guidance_scale == 0.0:
            return model(x_t, t_batch, null).to(x_t.dtype), None
        # One forward of 2N: rows [0, N) conditional, [N, 2N) the null class.
        both = model(torch.cat([x_t, x_t]), torch.cat([t_batch, t_batch]), torch.cat([labels, null]))
        eps_cond, eps_uncond = both.to(x_t.dtype).chunk(2)
        return eps_cond, eps_uncond
