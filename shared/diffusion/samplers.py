"""Sampler loops: ancestral DDPM, DDIM, and DPM-Solver++(2M), with classifier-free guidance.

Every update goes through `shared.diffusion.steps.ddpm_step` / `ddim_step` (or, with fused_step=True, the
fused `kernels.ddpm_step` / `kernels.ddim_step` of the same signature, guidance folded in). The loops
own the random numbers: sample i with seed s draws x_T from stream (s, 0) and step k's fresh noise
from stream (s, k + 1) (`shared.diffusion.noise.per_sample_noise`), so image i is the same at any batch size.

    sampler  timesteps visited                         update
    ddpm     all T (t = T−1 … 0), or respaced S < T    DDPM Alg. 2; respaced: DDIM Eq. 12 with η = 1
    ddim     ddim_timesteps(T, S, spacing)             DDIM Eq. 12 with the given η
    dpmpp    ddim_timesteps(T, S, spacing)             DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)

DPM-Solver++(2M) as a DDIM step. With λ = log(α/σ), α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), h = λ_prev − λ_t,
the 2M update x_prev = (σ_prev/σ_t)·x_t − α_prev·(e^{−h} − 1)·D equals DDIM (η = 0) applied to the
corrected data estimate D = (1 + 1/(2r))·x̂0_i − 1/(2r)·x̂0_{i−1}, r = h_{i−1}/h_i (Lu et al. 2022,
Eq. 9 and Alg. 2): both are α_prev·D + σ_prev·(x_t − α_t·D)/σ_t. So we hand ddim_step the ε that
corresponds to D, ε_D = (x_t − α_t·D)/σ_t. The first step and the final step onto t_prev = −1
(σ_prev = 0, h = ∞) are first order, i.e. plain DDIM.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from shared.errors import UserError
from shared.diffusion.guidance import cfg_combine, check_labels, model_eps
from shared.diffusion.steps import SPACINGS, VARIANCES, ddim_step, ddim_timesteps, ddpm_step, predict_x0_from_eps
from shared.diffusion.schedule import NoiseSchedule
from shared.diffusion.noise import per_sample_noise
from shared.model.precision import check_precision

SAMPLERS = ("ddpm", "ddim", "dpmpp")
# Stream 0 of a sample's seed draws x_T; step k draws its fresh noise from stream k + 1.
X_T_STREAM = 0

# callback(step_index, t, x_t, x0_pred): x_t the sample entering the step at timestep t, x0_pred its x̂0.
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


DEFAULT_FAST_STEPS = 50  # ddim / dpmpp without a step count


def default_steps(sampler: str, num_steps: int | None, num_train_timesteps: int) -> int:
    """The step count a sampler runs: num_steps if given, else T for ddpm and 50 (≤ T) for the others."""
    if num_steps is not None:
        return num_steps
    return num_train_timesteps if sampler == "ddpm" else min(DEFAULT_FAST_STEPS, num_train_timesteps)


def sampler_timesteps(sampler: str, num_train_timesteps: int, num_steps: int | None,
                      spacing: str = "trailing") -> list[int]:
    """The timesteps a sampler visits, descending; num_steps None means default_steps."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = default_steps(sampler, num_steps, num_train_timesteps)
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"steps must lie in [1, {num_train_timesteps}] for this model, got {steps}")
    if spacing not in SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return ddim_timesteps(num_train_timesteps, steps, spacing)


def _step_fns(fused_step: bool):
    if not fused_step:
        return ddpm_step, ddim_step
    import kernels  # raises kernels.FusedKernelsUnavailable (a UserError) with the reason

    return kernels.load("ddpm_step"), kernels.load("ddim_step")


def _alpha_sigma(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """(α_t, σ_t) = (√ᾱ_t, √(1−ᾱ_t)) in float64; t = −1 gives (1, 0)."""
    if t < 0:
        return 1.0, 0.0
    return float(schedule.sqrt_alphas_cumprod[t]), float(schedule.sqrt_one_minus_alphas_cumprod[t])


def _sample_batch(model, schedule: NoiseSchedule, seeds: Sequence[int], labels: torch.Tensor | None,
                  timesteps: list[int], sampler: str, eta: float, clip_x0: bool, guidance_scale: float,
                  variance: str, device: torch.device, precision: str, fused_step: bool,
                  callback: Callback | None, bar) -> torch.Tensor:
    ddpm_fn, ddim_fn = _step_fns(fused_step)
    shape_chw = (model.in_channels, model.image_size, model.image_size)
    x = per_sample_noise(seeds, shape_chw, device, torch.float32, X_T_STREAM)
    full_chain = sampler == "ddpm" and len(timesteps) == schedule.num_timesteps
    stochastic = sampler == "ddpm" or (sampler == "ddim" and eta > 0)
    last_x0: tuple[int, torch.Tensor] | None = None  # dpmpp: the previous step's (t, x̂0)

    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps, eps_uncond = model_eps(model, x, t, labels, guidance_scale, precision)
        # Deterministic updates (DDIM η = 0, DPM-Solver++) use no noise: skip drawing it. Stream i + 1
        # stays step i's either way, so the stochastic samplers' images do not depend on this.
        noise = per_sample_noise(seeds, shape_chw, device, torch.float32, i + 1) if stochastic else None
        # Guidance: the fused op combines in-kernel; the eager path combines here, before the step, and
        # so does dpmpp, whose 2M correction needs ε̃ itself.
        guided = {}
        if eps_uncond is not None:
            if fused_step and sampler != "dpmpp":
                guided = dict(eps_uncond=eps_uncond, guidance_scale=guidance_scale)
            else:
                eps = cfg_combine(eps, eps_uncond, guidance_scale)

        if full_chain:
            x_next, x0_pred = ddpm_fn(schedule, x, eps, t, noise=noise, clip_x0=clip_x0, variance=variance,
                                      return_x0=True, **guided)
        elif sampler in ("ddpm", "ddim"):
            step_eta = 1.0 if sampler == "ddpm" else eta
            x_next, x0_pred = ddim_fn(schedule, x, eps, t, t_prev, eta=step_eta, noise=noise, clip_x0=clip_x0,
                                      return_x0=True, **guided)
        else:
            x_next, x0_pred = _dpmpp_step(ddim_fn, schedule, x, eps, t, t_prev, clip_x0, last_x0)
            last_x0 = (t, x0_pred)
        if callback is not None:
            callback(i, t, x, x0_pred)
        x = x_next
        bar.update(1)
    return x


def _log_snr_half(schedule: NoiseSchedule, t: int) -> float:
    """λ_t = log(α_t / σ_t) (half the log-SNR), in float64."""
    alpha, sigma = _alpha_sigma(schedule, t)
    return math.log(alpha / sigma)


def _dpmpp_step(ddim_fn, schedule, x, eps, t, t_prev, clip_x0, last_x0):
    """One DPM-Solver++(2M) step, through ddim_fn (see the module docstring); returns (x_prev, x̂0).

    last_x0: the previous step's (t, x̂0), None on the first step.
    """
    x0_pred = predict_x0_from_eps(schedule, x, eps, t)  # x̂0_i
    if clip_x0:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
    data_estimate = x0_pred
    if last_x0 is not None and t_prev >= 0:  # second order, except first and final (σ_prev = 0) steps
        t_last, x0_last = last_x0
        lam_last, lam_t, lam_prev = (_log_snr_half(schedule, s) for s in (t_last, t, t_prev))
        r = (lam_t - lam_last) / (lam_prev - lam_t)  # r_i = h_{i−1} / h_i
        data_estimate = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * x0_last
    alpha_t, sigma_t = _alpha_sigma(schedule, t)
    eps_d = (x - alpha_t * data_estimate) / sigma_t  # the ε for which DDIM's x̂0 is D
    return ddim_fn(schedule, x, eps_d, t, t_prev, eta=0.0), x0_pred


@torch.no_grad()
def sample(model: torch.nn.Module, schedule: NoiseSchedule, seeds: Sequence[int], *,
           labels: torch.Tensor | Sequence[int] | None = None, sampler: str = "ddim",
           num_steps: int | None = None, eta: float = 0.0, spacing: str = "trailing", clip_x0: bool = False,
           guidance_scale: float = 1.0, variance: str = "fixed_small", batch_size: int = 64,
           device: torch.device | str | None = None, precision: str = "fp32", fused_step: bool = False,
           callback: Callback | None = None, progress: bool = True) -> torch.Tensor:
    """Draws len(seeds) samples; returns float32 [N x C x H x W] on `device` (not clipped).

    seeds: one int per sample (image i depends on seeds[i] only, not on batch_size).
    labels: [N] class indices for a class-conditional model (None: unconditional, ε_θ(x, ∅)).
    num_steps: steps S (default: T for ddpm, 50 for ddim/dpmpp).  guidance_scale: w of
    ε̃ = ε_u + w(ε_c − ε_u).  callback(step_index, t, x_t, x̂0) sees every step of every batch.
    fused_step: use kernels.ddpm_step / kernels.ddim_step (issue 6) for the update.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if variance not in VARIANCES:
        raise UserError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    check_precision(precision)
    if not eta >= 0 or not guidance_scale >= 0 or batch_size < 1:
        raise UserError(f"need eta >= 0, guidance_scale >= 0, batch_size >= 1 "
                        f"(got {eta}, {guidance_scale}, {batch_size})")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("no seeds given: nothing to sample")
    timesteps = sampler_timesteps(sampler, schedule.num_timesteps, num_steps, spacing)
    labels = check_labels(labels, len(seeds), getattr(model, "num_classes", 0))
    device = torch.device(device) if device is not None else next(model.parameters()).device

    out = []
    n_batches = math.ceil(len(seeds) / batch_size)
    with tqdm(total=n_batches * len(timesteps), desc=f"{sampler} {len(timesteps)} steps", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(seeds), batch_size):
            chunk = slice(start, start + batch_size)
            batch_labels = labels[chunk].to(device) if labels is not None else None
            out.append(_sample_batch(model, schedule, seeds[chunk], batch_labels, timesteps, sampler, eta,
                                     clip_x0, guidance_scale, variance, device, precision, fused_step,
                                     callback, bar))
    return torch.cat(out)
