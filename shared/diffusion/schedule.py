"""Noise schedules β_t and every coefficient derived from them, computed once in float64.

Notation (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021, "improved DDPM"), t = 0 … T−1:

    code name                         symbol              definition
    betas                             β_t                 variance added at step t
    alphas                            α_t                 1 − β_t
    alphas_cumprod                    ᾱ_t                 ∏_{s≤t} α_s                      (DDPM Eq. 4)
    alphas_cumprod_prev               ᾱ_{t−1}             with ᾱ_{−1} = 1
    posterior_variance                β̃_t                 (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t  (DDPM Eq. 7)
    posterior_mean_coef1              coefficient of x0   √ᾱ_{t−1} β_t / (1 − ᾱ_t)         (DDPM Eq. 7)
    posterior_mean_coef2              coefficient of x_t  √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)   (DDPM Eq. 7)
    posterior_log_variance_clipped    log β̃_t             β̃_0 = 0, so log β̃_1 stands in at t = 0
    log_snr                           λ_t                 log(ᾱ_t / (1 − ᾱ_t))
    sigmas                            σ_t (EDM)           √(1/ᾱ_t − 1): the noise level of x_t/√ᾱ_t

The array index is the timestep: `alphas_cumprod[t]` is ᾱ_t, and the last entry is ᾱ_{T−1}, the
noisiest level (called ᾱ_T in the papers' 1-based counting).

EDM's noise levels on these discrete-time models (Karras et al. 2022, "Elucidating the design space of
diffusion-based generative models"): x_t = √ᾱ_t·(x0 + σ_t·ε), so x_σ = x_t/√ᾱ_t = x0 + σ·ε is the
variance-exploding form and √ᾱ = 1/√(σ² + 1) the scaling s(t) of their Eq. 4. `karras_sigmas` is their
time-step discretisation (Eq. 5, ρ = 7) between σ_0 and σ_{T−1}; `timestep_from_sigma` gives the
(fractional) network timestep of any σ by linear interpolation of log σ_t between neighbouring
timesteps, and `alpha_bar_at` is its inverse, as diffusers' EulerDiscreteScheduler / HeunDiscreteScheduler
do (`_sigma_to_t`). At an integer t both are exact.
"""
from __future__ import annotations

import copy
import math

import torch

from shared.errors import UserError

# Ho et al. 2020, Sec. 4: β rises linearly from 1e-4 to 0.02 over T = 1000 steps.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
LINEAR_REFERENCE_T = 1000
# Nichol & Dhariwal 2021, Eq. 17: offset s keeps β_0 from being vanishingly small ...
COSINE_OFFSET_S = 0.008
# ... and β is clipped at 0.999 so the last steps near t = T stay finite (their Sec. 3.2).
MAX_BETA = 0.999

SCHEDULE_KINDS = ("linear", "cosine")
# Karras et al. 2022, Eq. 5 and Sec. 3: ρ = 7 spaces the sampling noise levels densely near σ_min.
KARRAS_RHO = 7.0


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's linear β_t, float64 of shape [T].

    For T ≠ 1000 the endpoints are scaled by 1000/T (as improved-diffusion does), so that ᾱ at the end
    of the chain stays close to the T = 1000 value; β is capped at MAX_BETA for very short chains.
    """
    scale = LINEAR_REFERENCE_T / num_timesteps
    betas = torch.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_timesteps,
                           dtype=torch.float64)
    return betas.clamp(max=MAX_BETA)


def cosine_betas(num_timesteps: int, s: float = COSINE_OFFSET_S) -> torch.Tensor:
    """Cosine schedule, float64 of shape [T] (Nichol & Dhariwal 2021, Eq. 17).

    ᾱ(τ) = f(τ)/f(0) with f(τ) = cos²(((τ/T) + s)/(1 + s) · π/2), and β_t = 1 − ᾱ(t+1)/ᾱ(t), ≤ 0.999.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=MAX_BETA)


class NoiseSchedule:
    """A variance schedule and its derived coefficients, all 1-D float64 CPU tensors of length T.

    >>> sched = NoiseSchedule("cosine", 1000)
    >>> sched.alphas_cumprod.shape
    torch.Size([1000])
    """

    def __init__(self, kind: str = "linear", num_timesteps: int = 1000):
        if kind not in SCHEDULE_KINDS:
            raise UserError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
        if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
            raise UserError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
        self.kind = kind
        self.num_timesteps = num_timesteps

        betas = linear_betas(num_timesteps) if kind == "linear" else cosine_betas(num_timesteps)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

        # For q(x_t | x_0) and for recovering x0 from (x_t, ε).
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # The posterior q(x_{t-1} | x_t, x_0) = N(coef1·x0 + coef2·x_t, β̃_t I), DDPM Eqs. 6-7.
        one_minus_ac = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_ac
        # β̃_0 = 0 (x_0 is then known exactly); its log would be -inf, so t = 0 borrows β̃_1.
        # With T = 1 there is no β̃_1: the chain's only step is deterministic and the log is unused.
        first = self.posterior_variance[1:2] if num_timesteps > 1 else torch.ones(1, dtype=torch.float64)
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus_ac
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / one_minus_ac

        self.log_snr = torch.log(self.alphas_cumprod) - torch.log(one_minus_ac)
        self.sigmas = self.sqrt_recipm1_alphas_cumprod  # EDM's name for √(1/ᾱ_t − 1): σ_t, increasing in t

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps})"

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """This schedule with its arrays on `device` (still float64); itself when they are there already.

        The training step gathers coefficients by per-sample t on the device: arrays on the CPU would be
        copied from pageable memory at every step, and such a copy makes the host wait for the GPU (and
        cannot be captured in a CUDA graph)."""
        device = torch.device(device)
        if self.betas.device == device:
            return self
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(moved, name, value.to(device))
        return moved

    def to_dict(self) -> dict:
        """What a checkpoint stores to rebuild this schedule."""
        return {"kind": self.kind, "num_timesteps": self.num_timesteps}


def extract(coef: torch.Tensor, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gathers coef[t] and shapes it to broadcast against `like`, in like's dtype and device.

    coef: [T] float64 schedule array.  t: an int, or a LongTensor [N] of per-sample timesteps with
    N = like.shape[0].  Returns [N, 1, 1, …] (or [1, 1, …] for an int t) with like.ndim dimensions.
    The gather happens in float64; only the result is cast, so no coefficient is rounded twice.
    """
    num_timesteps = coef.shape[0]
    view = [1] * like.ndim
    if isinstance(t, int) and not isinstance(t, bool):
        if not 0 <= t < num_timesteps:
            raise ValueError(f"timestep {t} is outside [0, {num_timesteps})")
        # A fill from the Python scalar, not a host-to-device copy: a copy from pageable memory would
        # make the host wait for the GPU at every sampler step.
        return torch.full(view, coef[t].item(), dtype=like.dtype, device=like.device)
    if not torch.is_tensor(t) or t.dtype not in (torch.int64, torch.int32) or t.ndim != 1:
        raise ValueError(f"t must be an int or a 1-D integer tensor, got {type(t).__name__} "
                         f"{getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}")
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"t has {t.shape[0]} timesteps for a batch of {like.shape[0]}")
    view[0] = t.shape[0]
    gathered = coef.to(t.device)[t.long()]
    return gathered.to(device=like.device, dtype=like.dtype).reshape(view)


# --------------------------------------------------------------------------------------------------
# EDM noise levels (module docstring)


def karras_sigmas(schedule: NoiseSchedule, num_steps: int, rho: float = KARRAS_RHO) -> list[float]:
    """The S noise levels a Karras-schedule sampler visits, descending from σ_max = σ_{T−1} to σ_min = σ_0:

        σ_i = (σ_max^{1/ρ} + i/(S−1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,   i = 0 … S−1      (EDM Eq. 5)

    (the final level σ_S = 0 is the sampler's to add). Float64 Python floats; S = 1 gives [σ_max]. The
    same levels as diffusers' `use_karras_sigmas=True` with timestep_spacing="linspace" (their default).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    sigma_min, sigma_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    if num_steps == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    ramp = [i / (num_steps - 1) for i in range(num_steps)]
    return [(hi * (1.0 - r) + lo * r) ** rho for r in ramp]  # Eq. 5's hi + r·(lo − hi), rearranged


def timestep_from_sigma(schedule: NoiseSchedule, sigma: float) -> float:
    """The fractional timestep τ with log σ(τ) = log σ, σ(τ) interpolated log-linearly between the
    timesteps around it; clamped to [0, T−1] outside σ_0 … σ_{T−1}. A float64 Python float."""
    log_sigmas = schedule.sigmas.log()
    last = schedule.num_timesteps - 1
    if last == 0:
        return 0.0
    log_sigma = math.log(max(sigma, 1e-10))
    low = min(max(int(torch.searchsorted(log_sigmas, torch.tensor(log_sigma, dtype=torch.float64),
                                         right=True)) - 1, 0), last - 1)
    lo, hi = float(log_sigmas[low]), float(log_sigmas[low + 1])
    weight = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
    return low + weight


def alpha_bar_at(schedule: NoiseSchedule, t: float) -> float:
    """ᾱ at a (fractional) timestep t in [0, T−1]: 1/(1 + σ(t)²) with log σ interpolated linearly between
    the integer timesteps around t (the inverse of timestep_from_sigma); ᾱ_t itself at an integer t."""
    if isinstance(t, int) and not isinstance(t, bool):
        return float(schedule.alphas_cumprod[t])
    if not 0.0 <= t <= schedule.num_timesteps - 1:
        raise ValueError(f"timestep {t} is outside [0, {schedule.num_timesteps - 1}]")
    low = min(int(math.floor(t)), schedule.num_timesteps - 2) if schedule.num_timesteps > 1 else 0
    log_sigmas = schedule.sigmas.log()
    frac = t - low
    log_sigma = (1.0 - frac) * float(log_sigmas[low]) + frac * float(log_sigmas[low + 1])
    return alpha_bar_from_sigma(math.exp(log_sigma))


def alpha_bar_from_sigma(sigma: float) -> float:
    """ᾱ = 1/(σ² + 1) of an EDM noise level σ ≥ 0 (√ᾱ is EDM's scaling s(t) of these models)."""
    return 1.0 / (1.0 + sigma * sigma)


def sigma_from_alpha_bar(alpha_bar: float) -> float:
    """The EDM noise level σ = √(1/ᾱ − 1) of ᾱ in (0, 1]."""
    return math.sqrt(1.0 / alpha_bar - 1.0)
