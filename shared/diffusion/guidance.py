"""Classifier-free guidance (Ho & Salimans 2022): the guided noise prediction and its batched forward.

    ε̃(x_t, y) = ε_θ(x_t, ∅) + w · (ε_θ(x_t, y) − ε_θ(x_t, ∅))        (Ho & Salimans 2022, Eq. 6,
                                                                     written with w = 1 + their w)

w = 0 is the unconditional model, w = 1 the plain conditional model, w > 1 pushes samples towards
what makes the class recognisable (at some cost in diversity). ∅ is the learned null class
(`model.null_class`) the network saw for a fraction of training examples.

Two refinements, both off by default:

  * CFG rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
    Sec. 3.4; diffusers' `guidance_rescale`): the guided output is rescaled to the per-sample standard
    deviation of the conditional one, x_rescaled = x_cfg · std(x_c)/std(x_cfg), and mixed back,
    φ·x_rescaled + (1 − φ)·x_cfg (`rescale_cfg`). It acts on the network's own output (ε, v or x̂0), as
    diffusers' pipelines apply it to their `noise_pred`.
  * A guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
    sample and distribution quality in diffusion models", Sec. 3): guidance only at noise levels
    σ ∈ (σ_lo, σ_hi], the conditional model (w = 1) elsewhere (`in_guidance_interval`), with σ the EDM
    noise level √((1 − ᾱ)/ᾱ) of the step's input (shared.diffusion.schedule).
"""
from __future__ import annotations

from typing import Sequence

import torch

from shared.diffusion.prediction import eps_coefficients, eps_from_output, prediction_of
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


def rescale_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale) -> torch.Tensor:
    """φ·x_cfg·std(x_c)/std(x_cfg) + (1 − φ)·x_cfg (Lin et al. 2024, Sec. 3.4), std per sample over
    [C x H x W]. guided x_cfg, cond x_c: [N x C x H x W]; guidance_rescale φ in [0, 1], a float or a
    0-dim tensor (a CUDA graph's table entry)."""
    if guided.shape != cond.shape:
        raise ValueError(f"guided {tuple(guided.shape)} and cond {tuple(cond.shape)} differ")
    dims = list(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (guidance_rescale * ratio + (1.0 - guidance_rescale))


def in_guidance_interval(sigma: float, interval: tuple[float, float] | None) -> bool:
    """Whether guidance applies at EDM noise level σ: always without an interval, else σ_lo < σ ≤ σ_hi
    (Kynkäänniemi et al. 2024, Sec. 3)."""
    if interval is None:
        return True
    low, high = interval
    return low < sigma <= high


def model_eps(model: torch.nn.Module, x_t: torch.Tensor, t: int | torch.Tensor, labels: torch.Tensor | None,
              guidance_scale: float = 1.0, precision: str = "fp32"):
    """Runs ε_θ for one sampler step, with both guidance passes batched into one forward.

    x_t: [N x C x H x W]; t: one timestep for the batch (an int, or a float between timesteps for the
    Karras samplers), or a tensor [N] on x_t's device (what a captured CUDA graph reads); labels:
    LongTensor [N] or None. The outputs are the network's own (ε, v or x̂0: shared.diffusion.prediction);
    the sampler turns them into ε.
    Returns (eps, eps_uncond), float32 like x_t: eps_uncond is None when one pass gives ε̃ exactly —
    an unconditional model or no labels (ε_θ(x, ∅)), w = 1 (ε_c alone) or w = 0 (ε_u alone) — and
    otherwise the caller combines with `cfg_combine(eps, eps_uncond, w)` (or hands both to a fused step).
    """
    n = x_t.shape[0]
    # From a Python int: a fill, not a host-to-device copy (no wait on the device per step).
    if torch.is_tensor(t):
        t_batch = t
    else:
        kind = torch.long if isinstance(t, int) else torch.float32
        t_batch = torch.full((n,), t, dtype=kind, device=x_t.device)
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


def guided_eps(model: torch.nn.Module, sampler, i: int, x_t: torch.Tensor, labels: torch.Tensor | None):
    """(ε, ε_u or None) for model call i of `sampler` at x_t [N x C x H x W]: the one place where a network's
    output becomes the ε every update takes (shared.diffusion.prediction).

      1. the network at sampler.timesteps[i], both guidance passes in one forward (`model_eps`) at the
         call's w, sampler.guidance_scales[i] (1 outside a guidance interval);
      2. with opts.guidance_rescale φ > 0, the guided output rescaled (`rescale_cfg`) and returned combined;
      3. each output turned into ε at the call's ᾱ, sampler.alpha_bars[i] (`eps_from_output`).

    ε_u is returned only when the caller is to combine ε̃ = ε_u + w·(ε_c − ε_u) itself (a fused step does)."""
    opts, w = sampler.opts, sampler.guidance_scales[i]
    out, out_uncond = model_eps(model, x_t, sampler.timesteps[i], labels, w, opts.precision)
    if out_uncond is not None and opts.guidance_rescale > 0:
        out, out_uncond = rescale_cfg(cfg_combine(out, out_uncond, w), out, opts.guidance_rescale), None
    coefficients = eps_coefficients(prediction_of(model), sampler.alpha_bars[i])
    eps = eps_from_output(out, x_t, coefficients)
    return eps, (None if out_uncond is None else eps_from_output(out_uncond, x_t, coefficients))
