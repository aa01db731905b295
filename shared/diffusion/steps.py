"""One reverse step of DDPM and of DDIM, the update they share, and the timestep lists of respaced samplers.

This is the one home of the reverse-step math, in three layers:

    ddpm_step / ddim_step          (schedule, x_t, ε, t …) → StepResult: checks, then the two below
    ddpm_coefficients / ddim_…     the float64 per-step scalars (shared.diffusion.coefficients)
    ddpm_update / ddim_update      the element-wise update from those scalars: the eager ground truth
                                   of the fused C++/CUDA op (`kernels.ddpm_step` / `ddim_step` have the
                                   same signature and are tested against these)
    affine_step                    every sampler's update in one affine form (what CUDA graphs replay)

All are pure functions: the caller passes the fresh noise z in (the samplers own the random
generators), so the same inputs always give the same output.

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

from typing import NamedTuple

import torch

from shared.diffusion.coefficients import (VARIANCES, StepCoefficients, check_eta, check_timestep,
                                           check_timestep_order, check_variance, ddim_coefficients,
                                           ddpm_coefficients)
from shared.diffusion.guidance import cfg_combine
from shared.diffusion.schedule import NoiseSchedule, extract

__all__ = ["ddpm_step", "ddim_step", "ddpm_update", "ddim_update", "affine_step", "StepResult", "ddim_timesteps",
           "predict_x0_from_eps", "x0_from_eps", "eps_from_x0", "SPACINGS", "VARIANCES"]

SPACINGS = ("trailing", "leading", "linspace")


class StepResult(NamedTuple):
    """What one reverse step gives: the sample it lands on and the x̂0 it went through (after clipping)."""
    x_prev: torch.Tensor   # [N x C x H x W]
    x0_pred: torch.Tensor  # [N x C x H x W]


def _check_tensors(x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None) -> None:
    """x_t, eps, noise: [N x C x H x W] (any shape with the batch first), all the same shape."""
    if not torch.is_tensor(x_t) or x_t.ndim < 2 or not x_t.is_floating_point():
        raise ValueError(f"x_t must be a floating tensor [N x ...], got {getattr(x_t, 'dtype', type(x_t))} "
                         f"{tuple(getattr(x_t, 'shape', ()))}")
    if eps.shape != x_t.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} does not match x_t shape {tuple(x_t.shape)}")
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x_t shape {tuple(x_t.shape)}")


# --------------------------------------------------------------------------------------------------
# x̂0 and ε from each other (DDPM Eq. 4 solved either way)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, x0_coef_xt, x0_coef_eps) -> torch.Tensor:
    """x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε  (DDPM Eq. 15 solved for x0); coefficients broadcast against x_t."""
    return x0_coef_xt * x_t - x0_coef_eps * eps


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, x0_coef_xt, x0_coef_eps) -> torch.Tensor:
    """ε = (√(1/ᾱ_t)·x_t − x̂0) / √(1/ᾱ_t − 1): the ε for which `x0_from_eps` gives x0."""
    return (x0_coef_xt * x_t - x0) / x0_coef_eps


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor,
                        t: int | torch.Tensor) -> torch.Tensor:
    """x̂0 from (x_t, ε) at timestep t (an int or a LongTensor [N]), in x_t's dtype."""
    return x0_from_eps(x_t, eps.to(x_t.dtype), extract(schedule.sqrt_recip_alphas_cumprod, t, x_t),
                       extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


# --------------------------------------------------------------------------------------------------
# The update from the per-step scalars: the reference of the fused op


def _coef(value, x_t: torch.Tensor) -> torch.Tensor:
    """A scalar as a tensor in x_t's dtype that broadcasts against x_t: [1, 1, …] for a float (filled
    from the Python value: no host-to-device copy), [N, 1, …] for a float64 tensor [N]."""
    view = [1] * x_t.ndim
    if torch.is_tensor(value):
        view[0] = value.shape[0]
        return value.to(device=x_t.device, dtype=x_t.dtype).reshape(view)
    return torch.full(view, value, dtype=x_t.dtype, device=x_t.device)


def _update(ddim: bool, x_t: torch.Tensor, eps: torch.Tensor, coefs: StepCoefficients, noise, clip_x0: bool,
            guidance: tuple, return_x0: bool):
    """ddpm_update (ddim False) or ddim_update; guidance: (eps_uncond or None, w)."""
    eps_uncond, guidance_scale = guidance
    _check_tensors(x_t, eps, noise)
    eps = eps.to(x_t.dtype)
    if eps_uncond is not None:
        eps = cfg_combine(eps, eps_uncond.to(x_t.dtype), guidance_scale)
    a, b = _coef(coefs.x0_coef_xt, x_t), _coef(coefs.x0_coef_eps, x_t)
    x0_pred = x0_from_eps(x_t, eps, a, b)
    if clip_x0:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
    if not ddim:
        rest = x_t
    else:  # the direction term points at the image actually predicted
        rest = eps_from_x0(x_t, x0_pred, a, b) if clip_x0 else eps
    x_prev = _coef(coefs.out_coef_x0, x_t) * x0_pred + _coef(coefs.out_coef_rest, x_t) * rest
    sigma_is_zero = not torch.is_tensor(coefs.sigma) and coefs.sigma == 0.0
    if noise is not None and not sigma_is_zero:
        x_prev = x_prev + _coef(coefs.sigma, x_t) * noise.to(x_t.dtype)
    return x_prev, (x0_pred if return_x0 else None)


def ddpm_update(x_t: torch.Tensor, eps: torch.Tensor, coefs: StepCoefficients, noise: torch.Tensor | None = None,
                clip_x0: bool = False, eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                return_x0: bool = True):
    """x_prev = c1·x̂0 + c2·x_t + σ·z from the scalars of `ddpm_coefficients` (DDPM Eq. 7, Alg. 2).

    ε̃ = ε_u + w·(ε_c − ε_u) when eps_uncond is given (`cfg_combine`), else ε_c; x̂0 = `x0_from_eps`,
    clamped to [−1, 1] with clip_x0. Tensors [N x C x H x W], arithmetic in x_t's dtype (each scalar
    rounded once to it). noise None, or a σ that is the Python float 0, drops the σ·z term.
    Returns (x_prev, x̂0, or None unless return_x0): the signature of the fused `kernels.ddpm_step`.
    """
    return _update(False, x_t, eps, coefs, noise, clip_x0, (eps_uncond, guidance_scale), return_x0)


def ddim_update(x_t: torch.Tensor, eps: torch.Tensor, coefs: StepCoefficients, noise: torch.Tensor | None = None,
                clip_x0: bool = False, eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                return_x0: bool = True):
    """x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̃ + σ·z from the scalars of `ddim_coefficients` (DDIM Eq. 12).

    As `ddpm_update`; with clip_x0, ε̃ is first recomputed from the clipped x̂0 (`eps_from_x0`), so the
    direction term points at the image actually predicted. The signature of the fused `kernels.ddim_step`.
    """
    return _update(True, x_t, eps, coefs, noise, clip_x0, (eps_uncond, guidance_scale), return_x0)


# --------------------------------------------------------------------------------------------------
# DDPM


def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor,
              noise: torch.Tensor | None = None, clip_x0: bool = False,
              variance: str = "fixed_small") -> StepResult:
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

    Returns StepResult(x_{t−1}, x̂0 after clipping), both [N x C x H x W] in x_t's dtype.
    """
    check_variance(variance)
    _check_tensors(x_t, eps, noise)
    check_timestep(t, "t", schedule.num_timesteps, 0, x_t.shape[0])
    return StepResult(*ddpm_update(x_t, eps, ddpm_coefficients(schedule, t, variance), noise, clip_x0))


# --------------------------------------------------------------------------------------------------
# DDIM


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor,
              t_prev: int | torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None,
              clip_x0: bool = False) -> StepResult:
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

    Returns StepResult(x_{t_prev}, x̂0 after clipping), both [N x C x H x W] in x_t's dtype.
    """
    check_eta(eta)
    _check_tensors(x_t, eps, noise)
    check_timestep(t, "t", schedule.num_timesteps, 0, x_t.shape[0])
    check_timestep(t_prev, "t_prev", schedule.num_timesteps, -1, x_t.shape[0])
    check_timestep_order(t, t_prev)
    return StepResult(*ddim_update(x_t, eps, ddim_coefficients(schedule, t, t_prev, float(eta)), noise, clip_x0))


# --------------------------------------------------------------------------------------------------
# Every sampler's update in one affine form


def affine_step(row: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None,
                x0_last: torch.Tensor, clip_x0: bool) -> StepResult:
    """Any sampler's step from its coefficient row [8], all on x_t's device:

        x̂0 = a·x_t − b·ε  (clipped if asked)      D = x̂0 + w·(x̂0 − x̂0_prev)      ε_D = (a·x_t − D) / b
        x_prev = c·D + d·x_t + e·ε_D + f·x̂0_prev + σ·z
        DDPM: c, d = posterior_mean_coef1/2, e = 0, w = f = 0      DDIM: c = √ᾱ_prev, d = 0, e = √(1−ᾱ_prev−σ²), w = f = 0
        DPM-Solver++(2M): as DDIM with σ = 0 and w = 1/(2r) (0 on first-order steps)
        Euler and Heun's first stage: DDIM on `euler_coefficients`
        Heun's second stage: a = √(σ'² + 1), b = σ', c = −k, d = 1, f = k = `heun_correction` (e = w = σ = 0)

    row: (a, b, c, d, e, σ, w, f) in x_t's dtype (`Sampler.coefficients`); x_t, eps, noise, x0_last (the
    previous step's x̂0): [N x C x H x W]. Reads no host value, so a CUDA graph can replay it with a new
    row each step.
    """
    a, b, c, d, e, sigma, w, f = row.unbind()
    x0_pred = x0_from_eps(x_t, eps, a, b)
    if clip_x0:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
    data_estimate = x0_pred + w * (x0_pred - x0_last)
    x_prev = c * data_estimate + d * x_t + e * eps_from_x0(x_t, data_estimate, a, b) + f * x0_last
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return StepResult(x_prev, x0_pred)


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
