"""The DDPM training loss L_simple (Ho et al. 2020, Eq. 14) and the label dropout of classifier-free guidance.

    t ~ Uniform{0, …, T−1},  ε ~ N(0, I)
    x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε                         (q_sample, Eq. 4)
    L_simple = ‖ε − ε_θ(x_t, t[, y])‖²                  (mean over pixels)

For a v- or x0-prediction network (`--prediction`, recorded on the network: shared.diffusion.prediction)
the same mean squared error regresses its own target, v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022,
Sec. 4) or x0, and the min-SNR-γ weights change with the target so that every parameterisation weighs
the implied x0 error by min(SNR_t, γ) (`min_snr_weight`).

One definition, used by the training step (loop.GradientStep), the held-out evaluation (heldout.py),
tests/tiny_trained.py and benches/bench_train.py.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from shared.diffusion.forward import q_sample
from shared.diffusion.prediction import check_prediction, prediction_of, training_target
from shared.diffusion.schedule import NoiseSchedule, extract


def l_simple(model, schedule: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None, *,
             generator: torch.Generator | None = None, autocast=None) -> torch.Tensor:
    """Per-image L_simple [N], in fp32 whatever the autocast dtype: ‖target − network(x_t, t, y)‖² with the
    target of the network's prediction type (ε, v or x0; `prediction_of(model)`, "eps" by default).

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
        prediction = model(x_t, t, y)
    target = training_target(prediction_of(model), x0, noise, extract(schedule.sqrt_alphas_cumprod, t, x0),
                             extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0))
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", Sec. 3.4), for the target a `prediction` network regresses:

        x0:  w_t = min(SNR_t, γ)
        ε:   w_t = min(SNR_t, γ) / SNR_t = min(1, γ / SNR_t)
        v:   w_t = min(SNR_t, γ) / (SNR_t + 1)                   SNR_t = ᾱ_t / (1 − ᾱ_t)

    An ε error e is an x0 error e/√SNR_t and a v error an x0 error e·√(1−ᾱ_t) (Salimans & Ho 2022), so
    all three weigh the x0 error by min(SNR_t, γ): the nearly noise-free steps (SNR_t ≫ γ) weigh less,
    and their easy gradients stop pulling against the noisy steps'. t: [N] timesteps. Returns [N] fp32
    weights on t's device.
    """
    check_prediction(prediction)
    log_snr = schedule.log_snr.to(t.device)[t]
    eps_weight = (gamma * torch.exp(-log_snr)).clamp(max=1.0)  # min(1, γ/SNR_t)
    if prediction == "x0":
        return (eps_weight * torch.exp(log_snr)).float()
    if prediction == "v":  # SNR_t / (SNR_t + 1) = ᾱ_t
        return (eps_weight * schedule.alphas_cumprod.to(t.device)[t]).float()
    return eps_weight.float()


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """y with each label replaced by the null class with probability p_uncond (Ho & Salimans 2022), so
    one network learns ε_θ(x_t, t, y) and ε_θ(x_t, t, ∅)."""
    drop = torch.rand(y.shape[0], device=y.device, generator=generator) < p_uncond
    return y.masked_fill(drop, null_class)
