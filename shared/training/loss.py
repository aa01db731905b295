"""The DDPM training loss L_simple (Ho et al. 2020, Eq. 14) and the label dropout of classifier-free guidance.

    t ~ Uniform{0, …, T−1},  ε ~ N(0, I)
    x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε                         (q_sample, Eq. 4)
    L_simple = ‖ε − ε_θ(x_t, t[, y])‖²                  (mean over pixels)

One definition, used by the training step (loop.GradientStep), the held-out evaluation (heldout.py),
tests/tiny_trained.py and benches/bench_train.py.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from shared.diffusion.forward import q_sample
from shared.diffusion.schedule import NoiseSchedule


def l_simple(model, schedule: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None, *,
             generator: torch.Generator | None = None, autocast=None) -> torch.Tensor:
    """Per-image L_simple [N], in fp32 whatever the autocast dtype.

    x0: [N x C x H x W] in [-1, 1]; y: [N] labels or None; t [N] and noise (ε, like x0) are drawn from
    `generator` (t first, then ε) when not given. autocast: the context the network runs in.
    """
    n = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (n,), device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=torch.float32, generator=generator)
    x_t = q_sample(schedule, x0, t, noise)
    with autocast if autocast is not None else nullcontext():
        eps_pred = model(x_t, t, y)
    return F.mse_loss(eps_pred.float(), noise, reduction="none").flatten(1).mean(1)


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023, "Efficient Diffusion Training
    via Min-SNR Weighting Strategy"), written for the ε target:

        w_t = min(SNR_t, γ) / SNR_t = min(1, γ / SNR_t),   SNR_t = ᾱ_t / (1 − ᾱ_t)

    The nearly noise-free steps (SNR_t ≫ γ) weigh less, so their easy gradients stop pulling against the
    noisy steps'. t: [N] timesteps. Returns [N] fp32 weights on t's device.
    """
    log_snr = schedule.log_snr.to(t.device)
    return (gamma * torch.exp(-log_snr[t])).clamp(max=1.0).float()


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """y with each label replaced by the null class with probability p_uncond (Ho & Salimans 2022), so
    one network learns ε_θ(x_t, t, y) and ε_θ(x_t, t, ∅)."""
    drop = torch.rand(y.shape[0], device=y.device, generator=generator) < p_uncond
    return y.masked_fill(drop, null_class)
