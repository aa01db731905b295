"""The forward (noising) process q(x_t | x_0) in closed form."""
from __future__ import annotations

import math

import torch

from shared.diffusion.schedule import NoiseSchedule, extract


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: int | torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Draws x_t ~ q(x_t | x_0) = N(√ᾱ_t x0, (1 − ᾱ_t) I) by reparameterisation (DDPM Eq. 4):

        x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε,   ε ~ N(0, I).

    x0, noise: [N x C x H x W] (any shape with the batch first).  t: an int or a LongTensor [N].
    Returns x_t in x0's dtype.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + \
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise.to(x0.dtype)


def q_jump(schedule: NoiseSchedule, x_from: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor) -> torch.Tensor:
    """Draws x_{t_to} ~ q(x_{t_to} | x_{t_from}) for t_from < t_to, the forward chain run on from t_from:

        x_{t_to} = √(ᾱ_{t_to}/ᾱ_{t_from}) · x_{t_from} + √(1 − ᾱ_{t_to}/ᾱ_{t_from}) · ε

    (DDPM Eq. 2 composed over the steps t_from+1 … t_to; one draw instead of RePaint's t_to − t_from
    applications of its Eq. 1, the same distribution). t_from = −1 is x0 itself (ᾱ = 1): q_sample.
    x_from, noise: [N x C x H x W]; t_from, t_to: ints in [−1, T). Returns x_{t_to} in x_from's dtype.
    """
    if noise.shape != x_from.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x shape {tuple(x_from.shape)}")
    if not -1 <= t_from < t_to < schedule.num_timesteps:
        raise ValueError(f"a forward jump needs -1 <= t_from < t_to < {schedule.num_timesteps}, got {t_from} -> {t_to}")
    ratio = float(schedule.alphas_cumprod[t_to]) / (float(schedule.alphas_cumprod[t_from]) if t_from >= 0 else 1.0)
    return math.sqrt(ratio) * x_from + math.sqrt(1.0 - ratio) * noise.to(x_from.dtype)


# How many standard errors a sample statistic may stray before we call it a mismatch: 5σ makes a
# false alarm on truly Gaussian noise about a one-in-a-million event.
PRIOR_CHECK_SIGMAS = 5.0
# Critical value of the Kolmogorov-Smirnov statistic at significance 0.001 is 1.95/√n (large n).
KS_CRITICAL_0P001 = 1.95
# Φ is Lipschitz with constant φ(0) = 1/√(2π): how far a shift of the values can move the CDF.
STD_NORMAL_PEAK = 0.3989422804014327


def prior_match_statistics(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor,
                           t: int | None = None) -> dict:
    """Checks that x_T, the last step of the forward process, is indistinguishable from N(0, I).

    x0: [N x C x H x W] data in [-1, 1]; noise: ε of the same shape; t: the step to test, by default
    T−1 (the last index).  With that t,
    x_T = √ᾱ_T x0 + √(1−ᾱ_T) ε has E[x_T²] ∈ [1 − ᾱ_T, 1] because |x0| ≤ 1, so over n values:
      |mean|      ≤ √ᾱ_T + 5/√n                     (data term + 5 standard errors of a N(0,1) mean)
      |std − 1|   ≤ ᾱ_T + 5/√(2n)                   (variance offset + 5 standard errors of a std)
      KS distance ≤ φ(0)·√ᾱ_T + ᾱ_T + 1.95/√n        (CDF shift by the data term + KS at p = 0.001)
    Those bounds allow for the signal still in x_T, so they only mean "indistinguishable" when that
    signal is itself below what n samples can resolve: the check also requires √ᾱ_T ≤ 5/√n.
    Returns each statistic, its bound, and `passed`.
    """
    last = schedule.num_timesteps - 1 if t is None else t
    x_t = q_sample(schedule, x0.double(), last, noise.double()).flatten()
    n = x_t.numel()
    alpha_bar = float(schedule.alphas_cumprod[last])
    mean, std = float(x_t.mean()), float(x_t.std())
    sorted_vals = x_t.sort().values
    cdf = 0.5 * (1 + torch.erf(sorted_vals / 2 ** 0.5))
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max())
    bounds = {
        "mean": alpha_bar ** 0.5 + PRIOR_CHECK_SIGMAS / n ** 0.5,
        "std": alpha_bar + PRIOR_CHECK_SIGMAS / (2 * n) ** 0.5,
        "ks": STD_NORMAL_PEAK * alpha_bar ** 0.5 + alpha_bar + KS_CRITICAL_0P001 / n ** 0.5,
    }
    stats = {"alpha_bar_T": alpha_bar, "n": n, "mean": mean, "std": std, "ks": ks, "bounds": bounds}
    stats["signal"], stats["resolution"] = alpha_bar ** 0.5, PRIOR_CHECK_SIGMAS / n ** 0.5
    stats["passed"] = (abs(mean) <= bounds["mean"] and abs(std - 1) <= bounds["std"] and ks <= bounds["ks"]
                       and stats["signal"] <= stats["resolution"])
    return stats
