"""One reverse step of DDPM and of DDIM, and the timestep lists of respaced samplers.

These are the eager PyTorch ground truth for every sampler in the repo; the fused C++/CUDA update of
`kernels.ddpm_step` / `kernels.ddim_step` is tested against them. Both steps are pure functions: the
caller passes the fresh noise z in (the samplers own the random generators), so the same inputs always
give the same output. The per-step scalars (float64 from the schedule), the timestep checks and the
element-wise update are the ones the fused op uses, from kernels/sampling_step/ (coefficients.py and
reference.py): the eager and the fused step share their math.

Notation (Ho et al. 2020 "DDPM"; Song et al. 2021 "DDIM"), index t = 0 … T−1:

    code name                         symbol        meaning
    x_t                               x_t           the current noisy sample
    eps                               ε_θ(x_t, t)   the model's noise prediction
    x0_pred                           x̂0            (x_t − √(1−ᾱ_t) ε) / √ᾱ_t         (DDPM Eq. 15)
    alphas_cumprod[t]                 ᾱ_t
    alpha_bar_prev                    ᾱ_{t_prev}    ᾱ of the next timestep of the list (1 at t_prev = −1)
    posterior_mean_coef1/2            c1, c2        μ̃_t = c1·x̂0 + c2·x_t            (DDPM Eq. 7)
    posterior_variance                β̃_t           "fixed_small" variance            (DDPM Eq. 7)
    betas                             β_t           "fixed_large" variance            (DDPM Sec. 3.2)
    sigma                             σ_t(η)        η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)  (DDIM Eq. 16)
    noise                             z             N(0, I), supplied by the caller

Numerics: every coefficient is gathered from the float64 schedule and combined in float64 (σ_t, the
direction coefficient), then cast once to the dtype of x_t; the tensor arithmetic runs in that dtype.
"""
from __future__ import annotations

import torch

from kernels.sampling_step import reference
from kernels.sampling_step.coefficients import (VARIANCES, check_eta, check_timestep, check_timestep_order,
                                                check_variance, ddim_coefficients, ddpm_coefficients)
from shared.diffusion.schedule import NoiseSchedule, extract

__all__ = ["ddpm_step", "ddim_step", "ddim_timesteps", "predict_x0_from_eps", "SPACINGS", "VARIANCES"]

SPACINGS = ("trailing", "leading", "linspace")


def _check_tensors(x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None) -> None:
    """x_t, eps, noise: [N x C x H x W] (any shape with the batch first), all the same shape."""
    if not torch.is_tensor(x_t) or x_t.ndim < 2 or not x_t.is_floating_point():
        raise ValueError(f"x_t must be a floating tensor [N x ...], got {getattr(x_t, 'dtype', type(x_t))} "
                         f"{tuple(getattr(x_t, 'shape', ()))}")
    if eps.shape != x_t.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} does not match x_t shape {tuple(x_t.shape)}")
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x_t shape {tuple(x_t.shape)}")


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor,
                        t: int | torch.Tensor) -> torch.Tensor:
    """x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε  (DDPM Eq. 15 solved for x0), in x_t's dtype."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps.to(x_t.dtype))


# --------------------------------------------------------------------------------------------------
# DDPM


def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor,
              noise: torch.Tensor | None = None, clip_x0: bool = False, variance: str = "fixed_small",
              return_x0: bool = False):
    """One ancestral step x_t → x_{t−1} (Ho et al. 2020, Algorithm 2), through the predicted x̂0.

    Stages:
      1. x̂0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε                      (DDPM Eq. 15 solved for x0)
      2. optionally clip x̂0 to [−1, 1] (as improved-diffusion's clip_denoised)
      3. μ̃_t = c1·x̂0 + c2·x_t                                      (DDPM Eq. 7)
      4. x_{t−1} = μ̃_t + σ_t z,  σ_t² = β̃_t ("fixed_small") or β_t ("fixed_large"), no noise at t = 0

    Without clipping, stages 1-3 equal Algorithm 2's 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε) exactly.

    Args:
      schedule: the NoiseSchedule the model was trained with.
      x_t, eps: [N x C x H x W]; eps is ε_θ(x_t, t) (already combined, for guidance).
      t: an int in [0, T) or a LongTensor [N] of per-sample timesteps.
      noise: z ~ N(0, I) of x_t's shape. None drops the σ_t z term and returns the mean μ̃_t.
      clip_x0: clip x̂0 to [−1, 1] before forming the mean.
      variance: "fixed_small" (β̃_t) or "fixed_large" (β_t).
      return_x0: also return x̂0 (after clipping), e.g. for trajectory pictures.

    Returns x_{t−1} [N x C x H x W] in x_t's dtype, or (x_{t−1}, x̂0) when return_x0.
    """
    check_variance(variance)
    _check_tensors(x_t, eps, noise)
    check_timestep(t, "t", schedule.num_timesteps, 0, x_t.shape[0])
    coefs = ddpm_coefficients(schedule, t, variance)
    x_prev, x0_pred = reference.step("ddpm", x_t, eps, coefs, noise=noise, clip_x0=clip_x0)
    return (x_prev, x0_pred) if return_x0 else x_prev


# --------------------------------------------------------------------------------------------------
# DDIM


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor,
              t_prev: int | torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None,
              clip_x0: bool = False, return_x0: bool = False):
    """One generalised step x_t → x_{t_prev} (Song et al. 2021, Eq. 12, σ_t from Eq. 16).

    Stages:
      1. x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                            ("predicted x0" of Eq. 12)
      2. optionally clip x̂0 to [−1, 1]; then ε is recomputed from the clipped x̂0,
         ε = (x_t − √ᾱ_t x̂0) / √(1−ᾱ_t), so the direction term agrees with it (as GLIDE does)
      3. σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev)          (Eq. 16)
      4. x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ_t²) ε + σ_t z          (Eq. 12)

    η = 0 is the deterministic DDIM sampler; η = 1 with t_prev = t − 1 is DDPM with β̃_t.
    t_prev = −1 means ᾱ_prev = 1: the step lands exactly on x̂0.

    Args:
      schedule: the NoiseSchedule the model was trained with.
      x_t, eps: [N x C x H x W]; eps is ε_θ(x_t, t) (already combined, for guidance).
      t: an int in [0, T) or a LongTensor [N].  t_prev: an int in [−1, t) or a LongTensor [N].
      eta: η ≥ 0, the stochasticity of Eq. 16.
      noise: z ~ N(0, I) of x_t's shape; None drops the σ_t z term.
      clip_x0: clip x̂0 to [−1, 1] (ε recomputed, stage 2).
      return_x0: also return x̂0 (after clipping).

    Returns x_{t_prev} [N x C x H x W] in x_t's dtype, or (x_{t_prev}, x̂0) when return_x0.
    """
    check_eta(eta)
    _check_tensors(x_t, eps, noise)
    check_timestep(t, "t", schedule.num_timesteps, 0, x_t.shape[0])
    check_timestep(t_prev, "t_prev", schedule.num_timesteps, -1, x_t.shape[0])
    check_timestep_order(t, t_prev)
    coefs = ddim_coefficients(schedule, t, t_prev, float(eta))
    x_prev, x0_pred = reference.step("ddim", x_t, eps, coefs, noise=noise, clip_x0=clip_x0)
    return (x_prev, x0_pred) if return_x0 else x_prev


# --------------------------------------------------------------------------------------------------
# respacing


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing") -> list[int]:
    """The descending timesteps a respaced sampler visits, as a list of num_steps ints in [0, T).

    Identical to diffusers' DDIMScheduler.set_timesteps (steps_offset = 0) for the same spacing:
      trailing: round(T − i·T/S) − 1 for i = 0 … S−1; starts at T−1, which matters with few steps
                (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Tab. 2)
      leading:  i·(T // S) for i = S−1 … 0 (the integer stride of the DDIM paper's code)
      linspace: round(linspace(0, T−1, S)), reversed
    Rounding is half-to-even, like numpy's. Works for any S in [1, T], divisible or not. A sampler pairs
    each entry with the next one (the last with −1), never with t − T//S.

    One deliberate difference: for some S that do not divide T (e.g. T = 17, S = 7), the float
    `arange(T, 0, −T/S)` behind diffusers' trailing list yields S + 1 values, the last ≈ 1e−15, which
    becomes the invalid timestep −1. We return exactly S entries; the S shared ones are identical.
    """
    T, S = num_train_timesteps, num_steps
    for name, value in (("num_train_timesteps", T), ("num_steps", S)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if S > T:
        raise ValueError(f"num_steps={S} cannot exceed num_train_timesteps={T}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")

    if spacing == "leading":
        stride = T // S
        return [i * stride for i in range(S - 1, -1, -1)]
    if spacing == "trailing":
        # The float64 arithmetic of numpy's arange(T, 0, -T/S): value_i = T + i·δ with δ = (T − T/S) − T.
        # Half-way cases (e.g. 7.5) make the exact float operations matter, so they are mirrored.
        step = T / S
        delta = (T - step) - T
        return [round(T + i * delta) - 1 for i in range(S)]
    # linspace(0, T−1, S): value_i = i·(T−1)/(S−1), the last pinned to T−1 (numpy does the same).
    if S == 1:
        return [0]
    div = (T - 1) / (S - 1)
    values = [i * div for i in range(S - 1)] + [float(T - 1)]
    return [round(v) for v in reversed(values)]
