"""The per-step scalars of the DDPM and DDIM updates, from the float64 schedule, and the checks of
their timestep arguments: the one definition of these formulas. The eager update
(shared.diffusion.steps) and the fused op (kernels.ddpm_step / ddim_step) both take their output.

`schedule` is any object with `num_timesteps` and these float64 tensors of shape [T] (the repo's
NoiseSchedule): alphas_cumprod ᾱ, betas β, posterior_variance β̃, posterior_mean_coef1/2,
sqrt_recip_alphas_cumprod √(1/ᾱ), sqrt_recipm1_alphas_cumprod √(1/ᾱ − 1).

A timestep is an int, or a 1-D integer tensor [N] of per-sample timesteps. For an int every scalar is
a Python float (float64 arithmetic on the host, nothing touches the device); for a tensor each is a
float64 tensor [N] on the timesteps' device. The formulas are written once for both.

Notation (t the current step, s the one stepped to), the fields of StepCoefficients:

    x0_coef_xt     √(1/ᾱ_t)                x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε   (DDPM Eq. 15 for x0)
    x0_coef_eps    √(1/ᾱ_t − 1)
    out_coef_x0    DDPM c1 = posterior_mean_coef1    μ̃ = c1·x̂0 + c2·x_t          (DDPM Eq. 7)
                   DDIM √ᾱ_s                          x_s = √ᾱ_s·x̂0 + √(1−ᾱ_s−σ²)·ε + σ·z (DDIM Eq. 12)
    out_coef_rest  DDPM c2 = posterior_mean_coef2 (times x_t); DDIM √(1 − ᾱ_s − σ²) (times ε)
    sigma          DDPM √β̃_t or √β_t, 0 at t = 0 (Alg. 2);  DDIM η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s) (Eq. 16)

Euler on EDM's noise levels (Karras et al. 2022, Alg. 1 lines 4-5) is a DDIM step with η = 0 between
two levels σ → σ' that need not be timesteps of the schedule: with x_σ = x_t/√ᾱ = x_t·√(σ² + 1) and
dx_σ/dσ = ε (their Eq. 4 with s = 1, σ(t) = t), x_σ' = x_σ + (σ' − σ)·ε = x̂0 + σ'·ε, which in the
samplers' coordinates x_t = x_σ/√(σ² + 1) is DDIM Eq. 12 with √ᾱ_s = 1/√(σ'² + 1): `euler_coefficients`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch

__all__ = ["VARIANCES", "StepCoefficients", "ddpm_coefficients", "ddim_coefficients", "euler_coefficients",
           "heun_correction", "check_timestep", "check_timestep_order", "check_eta", "check_variance"]

# DDPM's two choices of σ_t² (Ho et al. 2020, Sec. 3.2): the posterior variance β̃_t, or β_t.
VARIANCES = ("fixed_small", "fixed_large")

Scalar = Union[float, torch.Tensor]  # a Python float (an int t) or a float64 tensor [N] (a tensor t)


class StepCoefficients(NamedTuple):
    """The scalars of one step, in the order of the fused op's arguments (see the module notation)."""
    x0_coef_xt: Scalar
    x0_coef_eps: Scalar
    out_coef_x0: Scalar
    out_coef_rest: Scalar
    sigma: Scalar


# --------------------------------------------------------------------------------------------------
# checks


def check_timestep(t, name: str, num_timesteps: int, low: int, batch_size: int) -> None:
    """t: an int in [low, T), or a 1-D int32/int64 tensor [batch_size] of such values.

    A tensor's range is read back to the host (one sync): samplers pass ints, which never sync."""
    if isinstance(t, bool):
        raise ValueError(f"{name} must be an int or a 1-D integer tensor, got a bool")
    if isinstance(t, int):
        if not low <= t < num_timesteps:
            raise ValueError(f"{name}={t} is outside [{low}, {num_timesteps})")
        return
    if not torch.is_tensor(t) or t.dtype not in (torch.int64, torch.int32) or t.ndim != 1:
        raise ValueError(f"{name} must be an int or a 1-D integer tensor, got {type(t).__name__} "
                         f"{getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}")
    if t.shape[0] != batch_size:
        raise ValueError(f"{name} has {t.shape[0]} entries for a batch of {batch_size}")
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= num_timesteps:
            raise ValueError(f"{name} values must lie in [{low}, {num_timesteps}), got [{lo}, {hi}]")


def check_timestep_order(t, t_prev) -> None:
    """DDIM steps backwards: t_prev < t (elementwise for tensors, one host sync)."""
    if isinstance(t, int) and isinstance(t_prev, int):
        if t_prev >= t:
            raise ValueError(f"t_prev={t_prev} must be smaller than t={t}")
        return
    device = t.device if torch.is_tensor(t) else t_prev.device
    if bool((torch.as_tensor(t_prev, device=device) >= torch.as_tensor(t, device=device)).any()):
        raise ValueError("every t_prev must be smaller than its t")


def check_eta(eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")


def check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")


# --------------------------------------------------------------------------------------------------
# coefficients


def _sqrt(value: Scalar) -> Scalar:
    return value.sqrt() if torch.is_tensor(value) else math.sqrt(value)


def _at_least_zero(value: Scalar) -> Scalar:
    return value.clamp(min=0.0) if torch.is_tensor(value) else max(value, 0.0)


def _gather(coef: torch.Tensor, t) -> Scalar:
    """coef[t]: a Python float for an int t, a float64 tensor [N] on t's device for a tensor t."""
    if isinstance(t, int):
        return float(coef[t])
    return coef.to(t.device)[t.long()]


def ddpm_coefficients(schedule, t, variance: str = "fixed_small") -> StepCoefficients:
    """The scalars of one DDPM step at t (Ho et al. 2020, Alg. 2 with Eq. 7), after the checks."""
    check_variance(variance)
    var = schedule.posterior_variance if variance == "fixed_small" else schedule.betas
    if isinstance(t, int):
        # No noise is added at t = 0: the last step returns the posterior mean.
        sigma = math.sqrt(float(var[t])) if t > 0 else 0.0
    else:
        sigma = torch.where(t > 0, _gather(var, t).sqrt(), 0.0)
    return StepCoefficients(
        x0_coef_xt=_gather(schedule.sqrt_recip_alphas_cumprod, t),
        x0_coef_eps=_gather(schedule.sqrt_recipm1_alphas_cumprod, t),
        out_coef_x0=_gather(schedule.posterior_mean_coef1, t),
        out_coef_rest=_gather(schedule.posterior_mean_coef2, t),
        sigma=sigma,
    )


def ddim_coefficients(schedule, t, t_prev, eta: float = 0.0) -> StepCoefficients:
    """The scalars of one DDIM step t → t_prev (Song et al. 2021, Eq. 12 with σ from Eq. 16).

    t_prev = −1 means ᾱ_prev = 1: the step lands on x̂0 (σ = 0 and no direction term)."""
    alpha_bar = _gather(schedule.alphas_cumprod, t)
    if isinstance(t_prev, int):
        alpha_bar_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    else:
        gathered = _gather(schedule.alphas_cumprod, t_prev.clamp(min=0))
        alpha_bar_prev = torch.where(t_prev >= 0, gathered, 1.0)
    sigma = eta * _sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    # 1 − ᾱ_prev − σ² ≥ 0 in exact arithmetic for η ≤ 1; at η = 1 and t_prev = t − 1 it is zero up
    # to float64 rounding, and η > 1 makes it negative: both are clamped at 0.
    direction = _sqrt(_at_least_zero(1.0 - alpha_bar_prev - sigma * sigma))
    return StepCoefficients(
        x0_coef_xt=_gather(schedule.sqrt_recip_alphas_cumprod, t),
        x0_coef_eps=_gather(schedule.sqrt_recipm1_alphas_cumprod, t),
        out_coef_x0=_sqrt(alpha_bar_prev),
        out_coef_rest=direction,
        sigma=sigma,
    )


def euler_coefficients(sigma: float, sigma_next: float) -> StepCoefficients:
    """The scalars of one Euler step σ → σ' on the probability-flow ODE in the samplers' (variance-
    preserving) coordinates (module docstring; Karras et al. 2022, Alg. 1 lines 4-5):

        x̂0 = √(σ² + 1)·x_t − σ·ε                    x_next = (x̂0 + σ'·ε) / √(σ'² + 1)

    σ > 0, 0 ≤ σ' < σ, Python floats; σ' = 0 lands on x̂0. What diffusers' EulerDiscreteScheduler.step
    does on x_σ = x_t·√(σ² + 1) (s_churn = 0)."""
    if not (sigma > 0.0 and 0.0 <= sigma_next < sigma):
        raise ValueError(f"an Euler step needs sigma > sigma_next >= 0, got {sigma} -> {sigma_next}")
    scale_next = 1.0 / math.sqrt(sigma_next * sigma_next + 1.0)  # √ᾱ of the level stepped to
    return StepCoefficients(x0_coef_xt=math.sqrt(sigma * sigma + 1.0), x0_coef_eps=sigma, out_coef_x0=scale_next,
                            out_coef_rest=scale_next * sigma_next, sigma=0.0)


def heun_correction(sigma: float, sigma_next: float) -> float:
    """k of Heun's second stage written on the quantities a CUDA graph holds (Karras et al. 2022, Alg. 1
    lines 6-8): with x' the Euler step's result (at σ'), x̂0_1 its x̂0 and x̂0_2 the x̂0 of the model at x',
    x_next = x' + k·(x̂0_1 − x̂0_2), k = (σ' − σ) / (2σ' √(σ'² + 1)).

    That is line 8's x_σ + (σ' − σ)·(ε_1 + ε_2)/2: ε_1 = (x'_σ − x̂0_1)/σ' and ε_2 = (x'_σ − x̂0_2)/σ', so
    x_next,σ = x'_σ + (σ' − σ)/(2σ')·(x̂0_1 − x̂0_2), divided by √(σ'² + 1). σ' > 0 (no second stage onto 0)."""
    if not (sigma > sigma_next > 0.0):
        raise ValueError(f"Heun's second stage needs sigma > sigma_next > 0, got {sigma} -> {sigma_next}")
    scale_next = euler_coefficients(sigma, sigma_next).out_coef_x0  # 1/√(σ'² + 1)
    return (sigma_next - sigma) * scale_next / (2.0 * sigma_next)
