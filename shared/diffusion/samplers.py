"""Samplers behind one interface, and the loop that runs them: DDPM, DDIM, DPM-Solver++(2M), with CFG.

A sampler is what diffusers calls a scheduler: the timesteps it visits and one update,

    sampler.timesteps                       descending ints in [0, T)
    sampler.step(i, x_t, ε, z, ε_u)         → (x_prev, x̂0), the update of the i-th visited timestep
    sampler.stochastic                      whether step i consumes fresh noise z
    sampler.noise_in_kernel                 whether z goes in as InKernelNoise (the fused step draws it)

and the loop (`sample_batch`) owns the model calls and the random numbers: sample i with seed s draws
x_T from stream 0 of its seed and step k's noise from stream k + 1 (`shared.diffusion.noise`), so
image i is the same at any batch size. The loop never looks at a sampler's name.

    sampler  class               timesteps visited                      update
    ddpm     DDPMSampler         all T (t = T−1 … 0)                    DDPM Alg. 2
             DDIMSampler(η = 1)  respaced S < T                         DDIM Eq. 12 with η = 1
    ddim     DDIMSampler(η)      ddim_timesteps(T, S, spacing)          DDIM Eq. 12
    dpmpp    DPMSolverPP2M       ddim_timesteps(T, S, spacing)          DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)
    euler    EulerSampler        Karras σ_0 … σ_{S−1} (EDM Eq. 5)       Euler (Karras et al. 2022, Alg. 1 l. 4-5)
    heun     HeunSampler         the same, 2S − 1 network calls         Heun (Karras et al. 2022, Alg. 1)

Every update goes through `shared.diffusion.steps.ddpm_update` / `ddim_update` on the scalars of
`shared.diffusion.coefficients` (or, with fused_step, the fused `kernels.ddpm_step` / `kernels.ddim_step`
of the same signature, guidance folded in). The loop turns the network's output into ε first
(`shared.diffusion.guidance.guided_eps`: ε-, v- and x0-prediction networks alike), so no update knows
what the network predicts.

Euler and Heun on these discrete-time models, as diffusers' EulerDiscreteScheduler and
HeunDiscreteScheduler with use_karras_sigmas=True: the noise levels are EDM's σ = √((1−ᾱ)/ᾱ), the
network sees x_t = x_σ/√(σ² + 1) (their scale_model_input; here the loop's state itself) at the
fractional timestep `timestep_from_sigma(σ)`, and the Euler step is DDIM's on those levels
(`euler_coefficients`). Heun visits [σ_0, σ_1, σ_1, …, σ_{S−1}] like diffusers' list: an Euler stage,
then, unless σ_{i+1} = 0, a second call at σ_{i+1} whose ε is averaged with the first (Alg. 1 line 8).

DPM-Solver++(2M) as a DDIM step. With λ = log(α/σ), α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), h = λ_prev − λ_t,
the 2M update x_prev = (σ_prev/σ_t)·x_t − α_prev·(e^{−h} − 1)·D equals DDIM (η = 0) applied to the
corrected data estimate D = (1 + 1/(2r))·x̂0_i − 1/(2r)·x̂0_{i−1}, r = h_{i−1}/h_i (Lu et al. 2022,
Eq. 9 and Alg. 2): both are α_prev·D + σ_prev·(x_t − α_t·D)/σ_t. So we hand ddim_step the ε that
corresponds to D, ε_D = (x_t − α_t·D)/σ_t. The first step and the final step onto t_prev = −1
(σ_prev = 0, h = ∞) are first order, i.e. plain DDIM.

The same updates in one affine form (`shared.diffusion.steps.affine_step`), with per-call float64
coefficients (`Sampler.coefficients`, one row per network call) that a captured CUDA graph reads from a
device tensor (`GraphedSampling`), beside a second table of each call's guidance w and ε conversion.

Each network call i has its timestep `timesteps[i]`, its ᾱ `alpha_bars[i]` (what the output is
converted to ε at) and its guidance scale `guidance_scales[i]` (w, or 1 outside a guidance interval).
`nfe` counts the network evaluations of one chain (Heun: 2S − 1; inpainting: RePaint's down moves).

What a run is asked to do travels as one `SamplerOptions`, from the command line
(shared.interface.sampling_args) and the HTTP API (shared.interface.server) to `sample`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

import kernels
from kernels.sampling_step.op import InKernelNoise
from shared.diffusion.cuda_graphs import GraphedSampling
from shared.diffusion.coefficients import ddim_coefficients, ddpm_coefficients, euler_coefficients, heun_correction
from shared.diffusion.guidance import MAX_GUIDANCE, cfg_combine, check_labels, guided_eps, in_guidance_interval
from shared.diffusion.inpainting import INPAINT_SAMPLERS, Inpainting, RePaint, repaint_nfe
from shared.diffusion.noise import X_T_STREAM, per_sample_noise, seeds_tensor
from shared.diffusion.schedule import (NoiseSchedule, alpha_bar_at, alpha_bar_from_sigma, karras_sigmas,
                                       sigma_from_alpha_bar, timestep_from_sigma)
from shared.diffusion.steps import (SPACINGS, VARIANCES, ddim_timesteps, ddim_update, ddpm_update, eps_from_x0,
                                    predict_x0_from_eps, x0_from_eps)
from shared.errors import UserError
from shared.model.precision import check_precision

SAMPLERS = ("ddpm", "ddim", "dpmpp", "euler", "heun")
KARRAS_SAMPLERS = ("euler", "heun")  # on Karras sigmas; --spacing does not apply to them
# Stream 0 of a sample's seed draws x_T (X_T_STREAM); step k draws its fresh noise from stream k + 1.
DEFAULT_FAST_STEPS = 50  # every sampler but ddpm without a step count
# DDIM η: σ grows with η and past 1 the direction term is already clamped to 0, so a larger η only adds
# noise; the bound keeps σ (and the samples) finite.
MAX_ETA = 100.0
# Columns of Sampler.coefficients(): the affine form of the module docstring.
COEFFICIENTS = ("a", "b", "c", "d", "e", "sigma", "w", "f")

# callback(step_index, t, x_t, x0_pred): x_t the sample entering the step at timestep t, x0_pred its x̂0.
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """What one sampling run is asked to do; `check()` refuses bad values with a UserError."""

    sampler: str = "ddim"
    num_steps: int | None = None      # S; None: T for ddpm, 50 (≤ T) for ddim / dpmpp
    eta: float = 0.0                  # DDIM η ≥ 0
    spacing: str = "trailing"         # how S of the T timesteps are picked (SPACINGS)
    clip_x0: bool = False             # clip x̂0 to [−1, 1] at every step
    guidance_scale: float = 1.0       # CFG w: 0 unconditional, 1 conditional, > 1 guided
    variance: str = "fixed_small"     # DDPM σ_t²: β̃_t or β_t (VARIANCES)
    precision: str = "fp32"           # autocast dtype of the U-Net
    fused_step: bool = False          # kernels.ddpm_step / ddim_step for the update
    cuda_graphs: bool = False         # U-Net + step captured once per batch shape and replayed
    batch_size: int = 64              # images per forward (image i is the same at any batch size)
    guidance_rescale: float = 0.0     # CFG rescale φ in [0, 1] (Lin et al. 2024); 0: off
    guidance_interval: tuple[float, float] | None = None  # guidance only for EDM σ in (lo, hi]; None: always
    inpaint: Inpainting | None = None  # RePaint: keep the source where the mask is 0, draw where it is 1

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self._check_guidance()
        if self.inpaint is not None:
            if self.sampler not in INPAINT_SAMPLERS:
                raise UserError(f"inpainting resamples (RePaint) with one-step samplers: use --sampler "
                                f"{' or '.join(INPAINT_SAMPLERS)}, not {self.sampler}")
            if self.cuda_graphs:
                raise UserError("inpainting runs its chain eagerly; drop --cuda-graphs")
            self.inpaint.check()
        if self.variance not in VARIANCES:
            raise UserError(f"unknown variance {self.variance!r}; choose one of {', '.join(VARIANCES)}")
        if self.spacing not in SPACINGS:
            raise UserError(f"unknown spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        check_precision(self.precision)
        if not (math.isfinite(self.eta) and 0 <= self.eta <= MAX_ETA):
            raise UserError(f"eta must be a number in [0, {MAX_ETA}], got {self.eta}")
        if not (math.isfinite(self.guidance_scale) and 0 <= self.guidance_scale <= MAX_GUIDANCE):
            raise UserError(f"guidance_scale must be a number in [0, {MAX_GUIDANCE}], got {self.guidance_scale}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    def _check_guidance(self) -> None:
        if not (isinstance(self.guidance_rescale, (int, float)) and math.isfinite(self.guidance_rescale)
                and 0 <= self.guidance_rescale <= 1):
            raise UserError(f"guidance_rescale must be a number in [0, 1], got {self.guidance_rescale}")
        if self.guidance_interval is not None:
            try:
                low, high = (float(v) for v in self.guidance_interval)
            except (TypeError, ValueError):
                raise UserError(f"guidance_interval must be two numbers (lo, hi), got {self.guidance_interval!r}") from None
            if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
                raise UserError(f"guidance_interval (lo, hi) needs finite 0 <= lo < hi, got ({low}, {high})")


def default_steps(sampler: str, num_steps: int | None, num_train_timesteps: int) -> int:
    """The step count a sampler runs: num_steps if given, else T for ddpm and 50 (≤ T) for the others.
    For euler and heun a step is one noise level σ_i (diffusers' num_inference_steps)."""
    if num_steps is not None:
        return num_steps
    return num_train_timesteps if sampler == "ddpm" else min(DEFAULT_FAST_STEPS, num_train_timesteps)


def sampler_timesteps(sampler: str, num_train_timesteps: int, num_steps: int | None,
                      spacing: str = "trailing") -> list[int]:
    """The timesteps a ddpm / ddim / dpmpp sampler visits, descending; num_steps None means default_steps."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = checked_steps(sampler, num_steps, num_train_timesteps)
    if spacing not in SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return ddim_timesteps(num_train_timesteps, steps, spacing)


def checked_steps(sampler: str, num_steps: int | None, num_train_timesteps: int) -> int:
    """default_steps, refused (UserError) outside [1, T]."""
    steps = default_steps(sampler, num_steps, num_train_timesteps)
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"steps must lie in [1, {num_train_timesteps}] for this model, got {steps}")
    return steps


def count_nfe(opts: SamplerOptions, num_train_timesteps: int) -> int:
    """Network evaluations per image of one chain as opts asks (each one a forward of 1 or 2 images:
    guidance batches both passes): S, 2S − 1 for heun, RePaint's down moves when inpainting."""
    steps = checked_steps(opts.sampler, opts.num_steps, num_train_timesteps)
    if opts.inpaint is not None:
        return repaint_nfe(steps, opts.inpaint.jump_length, opts.inpaint.resamplings)
    return 2 * steps - 1 if opts.sampler == "heun" else steps


# --------------------------------------------------------------------------------------------------
# The samplers


class Sampler:
    """The network calls a solver makes and its update; subclasses implement `step` and `_row`.

    timesteps[i], alpha_bars[i], guidance_scales[i]: the network timestep, its ᾱ and the guidance w of
    call i (module docstring)."""

    stochastic = False

    def __init__(self, schedule: NoiseSchedule, timesteps: Sequence[int | float], opts: SamplerOptions):
        self.schedule, self.timesteps, self.opts = schedule, list(timesteps), opts
        self.alpha_bars = [self._alpha_bar(i) for i in range(len(self.timesteps))]
        self.guidance_scales = [opts.guidance_scale if in_guidance_interval(sigma_from_alpha_bar(ab),
                                                                             opts.guidance_interval) else 1.0
                                for ab in self.alpha_bars]
        # The eager update or its fused twin: the same signature (shared.diffusion.steps, kernels).
        self.ddpm_update = kernels.load("ddpm_step") if opts.fused_step else ddpm_update
        self.ddim_update = kernels.load("ddim_step") if opts.fused_step else ddim_update
        self.reset()

    def _alpha_bar(self, i: int) -> float:
        """ᾱ of network call i (the schedule's, at an integer timestep)."""
        return alpha_bar_at(self.schedule, self.timesteps[i])

    @property
    def nfe(self) -> int:
        """Network evaluations of one chain."""
        return len(self.timesteps)

    def t_prev(self, i: int) -> int:
        """The timestep step i lands on: the next visited one, −1 (x0) after the last."""
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def reset(self) -> None:
        """Forgets what earlier steps left (called before each batch)."""

    @property
    def noise_in_kernel(self) -> bool:
        """Whether step() takes an `InKernelNoise` for z: the fused DDPM / DDIM step draws it itself."""
        return self.opts.fused_step and self.stochastic

    def step(self, i: int, x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | InKernelNoise | None = None,
             eps_uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t [N x C x H x W] at call i → (x after it, x̂0), both [N x C x H x W]. noise: z
        [N x C x H x W], or an InKernelNoise when `noise_in_kernel`. With eps_uncond, ε is ε_c and the
        update forms ε̃ = ε_u + w·(ε_c − ε_u) itself (fused: in-kernel), w = guidance_scales[i]."""
        raise NotImplementedError

    def coefficients(self) -> torch.Tensor:
        """float64 [S x 8]: row i holds call i's (a, b, c, d, e, σ, w, f) of `affine_step`."""
        return torch.tensor([self._row(i) for i in range(len(self.timesteps))], dtype=torch.float64)

    def _row(self, i: int) -> list[float]:
        raise NotImplementedError


class DDPMSampler(Sampler):
    """Ancestral sampling over all T timesteps (Ho et al. 2020, Alg. 2)."""

    stochastic = True

    def step(self, i, x_t, eps, noise=None, eps_uncond=None):
        coefs = ddpm_coefficients(self.schedule, self.timesteps[i], self.opts.variance)
        return self.ddpm_update(x_t, eps, coefs, noise, self.opts.clip_x0, eps_uncond, self.guidance_scales[i])

    def _row(self, i):
        c = ddpm_coefficients(self.schedule, self.timesteps[i], self.opts.variance)
        return [c.x0_coef_xt, c.x0_coef_eps, c.out_coef_x0, c.out_coef_rest, 0.0, c.sigma, 0.0, 0.0]


class DDIMSampler(Sampler):
    """The generalised step of Song et al. 2021 (Eq. 12, σ from Eq. 16) at stochasticity η."""

    def __init__(self, schedule, timesteps, opts, eta: float):
        super().__init__(schedule, timesteps, opts)
        self.eta = eta
        self.stochastic = eta > 0

    def step(self, i, x_t, eps, noise=None, eps_uncond=None):
        coefs = ddim_coefficients(self.schedule, self.timesteps[i], self.t_prev(i), self.eta)
        return self.ddim_update(x_t, eps, coefs, noise, self.opts.clip_x0, eps_uncond, self.guidance_scales[i])

    def _row(self, i):
        c = ddim_coefficients(self.schedule, self.timesteps[i], self.t_prev(i), self.eta)
        return [c.x0_coef_xt, c.x0_coef_eps, c.out_coef_x0, 0.0, c.out_coef_rest, c.sigma, 0.0, 0.0]


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), each step a DDIM step on ε_D (module docstring)."""

    def reset(self):
        self.last_x0: torch.Tensor | None = None  # the previous step's x̂0

    def _log_snr_half(self, t: int) -> float:
        """λ_t = log(α_t / σ_t) = −log √(1/ᾱ_t − 1), half the log-SNR, in float64 (t ≥ 0)."""
        return -math.log(float(self.schedule.sqrt_recipm1_alphas_cumprod[t]))

    def _correction(self, i: int) -> float:
        """w = 1/(2r), r = h_{i−1}/h_i, of D = x̂0_i + w·(x̂0_i − x̂0_{i−1}); 0 on first-order steps
        (the first step, and the last one onto t = −1 where h = ∞)."""
        if i == 0 or self.t_prev(i) < 0:
            return 0.0
        lam_last, lam_t, lam_prev = (self._log_snr_half(s) for s in
                                     (self.timesteps[i - 1], self.timesteps[i], self.t_prev(i)))
        return (lam_prev - lam_t) / (2 * (lam_t - lam_last))

    def step(self, i, x_t, eps, noise=None, eps_uncond=None):
        if eps_uncond is not None:  # the 2M correction needs ε̃ itself
            eps = cfg_combine(eps, eps_uncond, self.guidance_scales[i])
        t = self.timesteps[i]
        x0_pred = predict_x0_from_eps(self.schedule, x_t, eps, t)  # x̂0_i
        if self.opts.clip_x0:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
        w = self._correction(i) if self.last_x0 is not None else 0.0
        data_estimate = x0_pred + w * (x0_pred - self.last_x0) if w else x0_pred
        coefs = ddim_coefficients(self.schedule, t, self.t_prev(i), 0.0)
        eps_d = eps_from_x0(x_t, data_estimate, coefs.x0_coef_xt, coefs.x0_coef_eps)  # DDIM's x̂0 is then D
        self.last_x0 = x0_pred
        x_prev, _ = self.ddim_update(x_t, eps_d, coefs, return_x0=False)
        return x_prev, x0_pred

    def _row(self, i):
        c = ddim_coefficients(self.schedule, self.timesteps[i], self.t_prev(i), 0.0)
        return [c.x0_coef_xt, c.x0_coef_eps, c.out_coef_x0, 0.0, c.out_coef_rest, 0.0, self._correction(i), 0.0]


class EulerSampler(Sampler):
    """Euler on the probability-flow ODE over the Karras sigmas (Karras et al. 2022, Alg. 1 lines 4-5 and
    Eq. 5; Alg. 2 with S_churn = 0): diffusers' EulerDiscreteScheduler(use_karras_sigmas=True).

    sigmas: σ_0 > … > σ_{S−1} > σ_S = 0; call i runs the network at σ_i (module docstring)."""

    def __init__(self, schedule, opts, num_steps: int):
        self.sigmas = karras_sigmas(schedule, num_steps) + [0.0]
        super().__init__(schedule, [timestep_from_sigma(schedule, s) for s in self.call_sigmas()], opts)

    def call_sigmas(self) -> list[float]:
        """σ of each network call."""
        return self.sigmas[:-1]

    def _alpha_bar(self, i):
        return alpha_bar_from_sigma(self.call_sigmas()[i])

    def step(self, i, x_t, eps, noise=None, eps_uncond=None):
        coefs = euler_coefficients(self.sigmas[i], self.sigmas[i + 1])
        return self.ddim_update(x_t, eps, coefs, None, self.opts.clip_x0, eps_uncond, self.guidance_scales[i])

    def _row(self, i):
        c = euler_coefficients(self.sigmas[i], self.sigmas[i + 1])
        return [c.x0_coef_xt, c.x0_coef_eps, c.out_coef_x0, 0.0, c.out_coef_rest, 0.0, 0.0, 0.0]


class HeunSampler(EulerSampler):
    """Heun's second-order method over the Karras sigmas (Karras et al. 2022, Alg. 1):
    diffusers' HeunDiscreteScheduler(use_karras_sigmas=True).

    Calls 2j (the Euler stage of step j, at σ_j) and 2j + 1 (the correction, at σ_{j+1}, for σ_{j+1} > 0):
    2S − 1 calls. The correction averages the two ε (each recomputed from its clipped x̂0 with clip_x0, as
    diffusers' clip_sample does) and takes the step from the stage's start: Alg. 1 line 8."""

    def call_sigmas(self):
        levels = self.sigmas[:-1]
        return [levels[0]] + [s for s in levels[1:] for _ in (0, 1)]

    def reset(self):
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None  # x_j and ε_1 of the Euler stage

    def _levels(self, i: int) -> tuple[int, bool]:
        """(step j, whether call i is its correction)."""
        return (i - 1) // 2 if i % 2 else i // 2, i % 2 == 1

    def step(self, i, x_t, eps, noise=None, eps_uncond=None):
        if eps_uncond is not None:  # the average needs ε̃ itself
            eps = cfg_combine(eps, eps_uncond, self.guidance_scales[i])
        j, correction = self._levels(i)
        sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
        if not correction:
            coefs = euler_coefficients(sigma, sigma_next)
            x_next, x0_pred = self.ddim_update(x_t, eps, coefs, None, self.opts.clip_x0)
            if self.opts.clip_x0:  # ε_1 as the clipped x̂0 implies it
                eps = eps_from_x0(x_t, x0_pred, coefs.x0_coef_xt, coefs.x0_coef_eps)
            self.first = (x_t, eps)
            return x_next, x0_pred
        here = euler_coefficients(sigma_next, 0.0)  # x̂0 at the correction's level σ_{j+1}
        x0_pred = x0_from_eps(x_t, eps, here.x0_coef_xt, here.x0_coef_eps)
        if self.opts.clip_x0:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
            eps = eps_from_x0(x_t, x0_pred, here.x0_coef_xt, here.x0_coef_eps)
        x_start, eps_first = self.first
        x_next, _ = self.ddim_update(x_start, 0.5 * (eps_first + eps), euler_coefficients(sigma, sigma_next),
                                     return_x0=False)
        return x_next, x0_pred

    def _row(self, i):
        j, correction = self._levels(i)
        if not correction:
            return super()._row(j)
        sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
        here, k = euler_coefficients(sigma_next, 0.0), heun_correction(sigma, sigma_next)
        return [here.x0_coef_xt, here.x0_coef_eps, -k, 1.0, 0.0, 0.0, 0.0, k]


def make_sampler(schedule: NoiseSchedule, opts: SamplerOptions, timesteps: Sequence[int] | None = None) -> Sampler:
    """The sampler opts asks for, visiting `timesteps` (default: sampler_timesteps of opts; the Karras
    samplers take their levels from opts.num_steps and refuse explicit timesteps)."""
    opts.check()
    if opts.sampler in KARRAS_SAMPLERS:
        if timesteps is not None:
            raise UserError(f"{opts.sampler} visits Karras sigmas, not a list of timesteps")
        steps = checked_steps(opts.sampler, opts.num_steps, schedule.num_timesteps)
        return (EulerSampler if opts.sampler == "euler" else HeunSampler)(schedule, opts, steps)
    if timesteps is None:
        timesteps = sampler_timesteps(opts.sampler, schedule.num_timesteps, opts.num_steps, opts.spacing)
    full_chain = list(timesteps) == list(range(schedule.num_timesteps - 1, -1, -1))
    if opts.sampler == "ddpm":  # respaced DDPM is DDIM with η = 1 (Song et al. 2021, Sec. 4.3)
        return DDPMSampler(schedule, timesteps, opts) if full_chain else DDIMSampler(schedule, timesteps, opts, 1.0)
    if opts.sampler == "ddim":
        return DDIMSampler(schedule, timesteps, opts, opts.eta)
    return DPMSolverPP2M(schedule, timesteps, opts)


# --------------------------------------------------------------------------------------------------
# The loop


def sample_batch(model: torch.nn.Module, sampler: Sampler, seeds: torch.Tensor, labels: torch.Tensor | None,
                 callback: Callback | None = None, bar=None, max_steps: int | None = None) -> torch.Tensor:
    """One batch through the whole chain: x_T from each seed, then every step of `sampler`.

    seeds: int64 [N] on the sampling device; labels: int64 [N] there, or None. max_steps stops after
    that many steps (benchmarks time a prefix of a long chain). Returns x at the last step, float32.
    """
    shape_chw = (model.in_channels, model.image_size, model.image_size)
    x = per_sample_noise(seeds, shape_chw, seeds.device, torch.float32, X_T_STREAM)
    sampler.reset()
    for i, t in enumerate(sampler.timesteps[:max_steps]):
        eps, eps_uncond = guided_eps(model, sampler, i, x, labels)  # the network's output as ε
        noise = None
        if sampler.noise_in_kernel:  # the fused step draws the same values itself: one pass fewer
            noise = InKernelNoise(seeds, i + 1)
        elif sampler.stochastic:
            noise = per_sample_noise(seeds, shape_chw, seeds.device, torch.float32, i + 1)
        x_next, x0_pred = sampler.step(i, x, eps, noise, eps_uncond)
        if callback is not None:
            callback(i, t, x, x0_pred)
        x = x_next
        if bar is not None:
            bar.update(1)
    return x


def sample_batches(model: torch.nn.Module, schedule: NoiseSchedule, seeds: Sequence[int],
                   opts: SamplerOptions = SamplerOptions(), labels: torch.Tensor | Sequence[int] | None = None,
                   device: torch.device | str | None = None, callback: Callback | None = None,
                   progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """`sample`, one batch of opts.batch_size at a time: checks everything now, then yields (index of
    the batch's first sample, its float32 [B x C x H x W] samples), so a caller can write each batch
    and drop it."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("no seeds given: nothing to sample")
    solver = make_sampler(schedule, opts)  # checks opts
    labels = check_labels(labels, len(seeds), getattr(model, "num_classes", 0))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if opts.cuda_graphs and device.type != "cuda":
        raise UserError(f"CUDA graphs need a CUDA device, but sampling runs on {device}; drop --cuda-graphs")
    all_seeds = seeds_tensor(seeds, device)
    # One GraphedSampling for the whole call: each batch shape is captured once and replayed after.
    run_batch = (GraphedSampling(model, solver, callback).run if opts.cuda_graphs
                 else functools.partial(sample_batch, model, solver, callback=callback))
    if opts.inpaint is not None:
        opts.inpaint.check((model.in_channels, model.image_size, model.image_size))
        run_batch = functools.partial(_inpaint_batch, model, solver, callback=callback)

    @torch.no_grad()
    def batches():
        nfe, size = count_nfe(opts, schedule.num_timesteps), opts.batch_size
        with tqdm(total=math.ceil(len(seeds) / size) * nfe, desc=f"{opts.sampler} {nfe} NFE",
                  disable=not progress, leave=False) as bar:
            for start in range(0, len(seeds), size):
                chunk = slice(start, start + size)
                batch_labels = labels[chunk].to(device) if labels is not None else None
                yield start, run_batch(all_seeds[chunk], batch_labels, bar=bar)

    return batches()


def _inpaint_batch(model, sampler, seeds, labels, callback=None, bar=None) -> torch.Tensor:
    """One batch through a RePaint chain (shared.diffusion.inpainting), with sample_batch's signature."""
    return RePaint(model, sampler, seeds, labels).run(callback, bar)


def sample(model: torch.nn.Module, schedule: NoiseSchedule, seeds: Sequence[int],
           opts: SamplerOptions = SamplerOptions(), labels: torch.Tensor | Sequence[int] | None = None,
           device: torch.device | str | None = None, callback: Callback | None = None,
           progress: bool = True) -> torch.Tensor:
    """Draws len(seeds) samples as `opts` asks; returns float32 [N x C x H x W] on `device` (not clipped).

    seeds: one int per sample (image i depends on seeds[i] only, not on opts.batch_size).
    labels: [N] class indices for a class-conditional model (None: unconditional, ε_θ(x, ∅)); with
    opts.guidance_scale w, ε̃ = ε_u + w(ε_c − ε_u).  device: default the model's.
    callback(step_index, t, x_t, x̂0) sees every step of every batch.  progress: a tqdm bar.
    """
    batches = sample_batches(model, schedule, seeds, opts, labels, device, callback, progress)
    return torch.cat([images for _, images in batches])
