"""Fused DDPM / DDIM sampling update: one pass over memory per step (C++/CUDA custom op).

`ddpm_step` and `ddim_step` take the arguments of `shared.ddpm_step` / `shared.ddim_step` plus
`eps_uncond=None, guidance_scale=1.0` (classifier-free guidance fused in) and `return_x0`. The
per-step scalars are gathered here, in float64, from the schedule; the op (kernels/csrc/) does the
element-wise work in fp32 whatever the storage dtype (float32, float16, bfloat16).

Notation (paper symbol → code), t the current step, s the one stepped to:

    ε̃ = ε_u + w·(ε_c − ε_u)      eps_uncond, guidance_scale, eps          (Ho & Salimans 2022, Eq. 6)
    x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̃   sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod
    DDPM  x_{t−1} = c1·x̂0 + c2·x_t + σ_t·z   posterior_mean_coef1/2; σ_t² = β̃_t or β_t  (Ho et al. Alg. 2)
    DDIM  x_s = √ᾱ_s·x̂0 + √(1 − ᾱ_s − σ²)·ε̃ + σ·z,  σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_s)
                                                                         (Song et al. Eq. 12, 16)

Layers and their errors:
- the op (torch.ops.sampling_step.*) checks shapes, dtypes, devices, contiguity and that noise is given
  when σ > 0 with TORCH_CHECK (a RuntimeError);
- these wrappers check t, t_prev, η, variance and missing noise first (ValueError), and pass every
  tensor through `.contiguous()`, so non-contiguous inputs work here at the cost of a copy;
- loading: the module built by setup.py (kernels._sampling_step_C) is imported; if it is absent, or
  older than its sources (an edit without a rebuild), it is built once with
  torch.utils.cpp_extension.load and cached (TORCH_EXTENSIONS_DIR); if that fails,
  `FusedKernelsUnavailable` names what is missing. There is no silent fallback to the eager step.

Unlike the eager steps, which drop the σ·z term when noise is None, a missing noise where σ > 0 is an
error here (the issue's contract): the fused samplers always pass it.
"""
from __future__ import annotations

import functools
import importlib
import math

import torch

from kernels import FusedKernelsUnavailable

__all__ = ["ddpm_step", "ddim_step", "ddpm_coefs", "ddim_coefs", "load_extension", "VARIANCES"]

# DDPM's two choices of σ_t² (Ho et al. Sec. 3.2): the posterior variance β̃_t, or β_t.
VARIANCES = ("fixed_small", "fixed_large")


# --------------------------------------------------------------------------------------------------
# Loading the compiled op


@functools.cache
def load_extension():
    """Imports (or JIT-builds, once) the extension and registers the fake kernels; returns the module."""
    from kernels import build

    try:
        if build.prebuilt_is_stale():
            raise ImportError("the prebuilt module is older than its sources")
        module = importlib.import_module(build.EXTENSION_NAME)
    except ImportError:
        try:
            module = build.jit_load()
        except build.BuildFailed as err:
            raise FusedKernelsUnavailable(
                f"the fused sampling step (C++ extension) is unavailable: {err}. Build it ahead with "
                "`pip install --no-build-isolation -e .`, or run without --fused-kernels") from err
    _register_fakes()
    return module


def _fake_step(x_t, eps, eps_uncond, noise, guidance_scale, coef_a, coef_b, coef_c, coef_d, sigma,
               clip_x0, return_x0):
    """Shapes only, for torch.compile: x_prev like x_t, x0_pred like x_t or an empty [0] tensor."""
    for name, other in (("eps", eps), ("eps_uncond", eps_uncond), ("noise", noise)):
        if other is not None:
            torch._check(other.shape == x_t.shape, lambda: f"{name} shape must match x_t")
            torch._check(other.dtype == x_t.dtype, lambda: f"{name} dtype must match x_t")
    x0_pred = torch.empty_like(x_t) if return_x0 else x_t.new_empty((0,))
    return torch.empty_like(x_t), x0_pred


def _register_fakes() -> None:
    for op in ("sampling_step::ddpm_step", "sampling_step::ddim_step"):
        torch.library.register_fake(op)(_fake_step)


# --------------------------------------------------------------------------------------------------
# Per-step scalars, float64 on the host


def _single_t(t, name: str, num_timesteps: int, low: int) -> int:
    """An int, or an integer tensor holding one value for the whole batch, checked in [low, T)."""
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.numel() == 0:
            raise ValueError(f"{name} must be an int or a non-empty integer tensor, got {t.dtype} "
                             f"of shape {tuple(t.shape)}")
        flat = t.reshape(-1)
        if bool((flat != flat[0]).any()):
            raise ValueError(f"the fused step needs one {name} for the whole batch, got "
                             f"{flat.tolist()}")
        t = int(flat[0])
    elif isinstance(t, bool) or not isinstance(t, int):
        raise ValueError(f"{name} must be an int, got {type(t).__name__}")
    if not low <= t < num_timesteps:
        raise ValueError(f"{name}={t} is out of range [{low}, {num_timesteps - 1}]")
    return t


def _check_guidance_scale(guidance_scale: float) -> None:
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")


def ddpm_coefs(schedule, t: int, variance: str = "fixed_small") -> dict[str, float]:
    """The scalars of one DDPM step at timestep t (Ho et al. 2020, Alg. 2 and Eq. 7), from float64."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    t = _single_t(t, "t", schedule.num_timesteps, 0)
    var = schedule.posterior_variance if variance == "fixed_small" else schedule.betas
    return {
        "sqrt_recip_alphas_cumprod": float(schedule.sqrt_recip_alphas_cumprod[t]),
        "sqrt_recipm1_alphas_cumprod": float(schedule.sqrt_recipm1_alphas_cumprod[t]),
        "posterior_mean_coef1": float(schedule.posterior_mean_coef1[t]),
        "posterior_mean_coef2": float(schedule.posterior_mean_coef2[t]),
        # No noise is added at t = 0: the last step returns the posterior mean.
        "sigma": math.sqrt(float(var[t])) if t > 0 else 0.0,
    }


def ddim_coefs(schedule, t: int, t_prev: int, eta: float = 0.0) -> dict[str, float]:
    """The scalars of one DDIM step t → t_prev (Song et al. 2021, Eq. 12 with σ from Eq. 16).

    t_prev = −1 means ᾱ_prev = 1: the step lands on x̂0 (σ = 0 and no direction term)."""
    t = _single_t(t, "t", schedule.num_timesteps, 0)
    t_prev = _single_t(t_prev, "t_prev", schedule.num_timesteps, -1)
    if t_prev >= t:
        raise ValueError(f"t_prev={t_prev} must be smaller than t={t}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    alpha_bar = float(schedule.alphas_cumprod[t])
    alpha_bar_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    sigma = eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)) * \
        math.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    # max(…, 0): at η = 1 and t_prev = t − 1 the difference is zero up to float64 rounding.
    direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma * sigma, 0.0))
    return {
        "sqrt_recip_alphas_cumprod": float(schedule.sqrt_recip_alphas_cumprod[t]),
        "sqrt_recipm1_alphas_cumprod": float(schedule.sqrt_recipm1_alphas_cumprod[t]),
        "sqrt_alphas_cumprod_prev": math.sqrt(alpha_bar_prev),
        "direction_coef": direction,
        "sigma": sigma,
    }


# --------------------------------------------------------------------------------------------------
# Public wrappers


def _prepare(x_t, eps, eps_uncond, noise, sigma: float):
    module = load_extension()
    if x_t.device.type == "cuda" and not module.with_cuda:
        raise FusedKernelsUnavailable(
            "the sampling-step extension was built without CUDA (no CUDA toolkit at build time), but "
            "x_t is on the GPU; set CUDA_HOME to the toolkit and rebuild, or run on the CPU")
    if sigma > 0 and noise is None:
        raise ValueError(f"noise is required for this step (sigma = {sigma:.3g} > 0: DDPM at t > 0 or "
                         "DDIM with eta > 0); pass noise of x_t's shape")

    def contiguous(tensor):
        return None if tensor is None else tensor.contiguous()

    return contiguous(x_t), contiguous(eps), contiguous(eps_uncond), contiguous(noise)


def _result(x_prev, x0_pred, return_x0: bool):
    return (x_prev, x0_pred) if return_x0 else x_prev


def ddpm_step(schedule, x_t: torch.Tensor, eps: torch.Tensor, t, noise: torch.Tensor | None = None,
              clip_x0: bool = False, variance: str = "fixed_small",
              eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
              return_x0: bool = False):
    """One fused DDPM ancestral step x_t → x_{t−1} (same conventions as `shared.ddpm_step`).

    x_t, eps (ε_c), eps_uncond (ε_u, optional), noise (z, needed for t > 0): [N x C x H x W] (any
    shape, all equal), float32/float16/bfloat16, one device. t: an int (or an integer tensor with one
    value) in [0, T). With eps_uncond, ε̃ = ε_u + guidance_scale·(ε_c − ε_u).
    Returns x_{t−1}, or (x_{t−1}, x0_pred) with return_x0, in x_t's dtype.
    """
    _check_guidance_scale(guidance_scale)
    c = ddpm_coefs(schedule, t, variance)
    x_t, eps, eps_uncond, noise = _prepare(x_t, eps, eps_uncond, noise, c["sigma"])
    x_prev, x0_pred = torch.ops.sampling_step.ddpm_step(
        x_t, eps, eps_uncond, noise, float(guidance_scale), c["sqrt_recip_alphas_cumprod"],
        c["sqrt_recipm1_alphas_cumprod"], c["posterior_mean_coef1"], c["posterior_mean_coef2"],
        c["sigma"], bool(clip_x0), bool(return_x0))
    return _result(x_prev, x0_pred, return_x0)


def ddim_step(schedule, x_t: torch.Tensor, eps: torch.Tensor, t, t_prev, eta: float = 0.0,
              noise: torch.Tensor | None = None, clip_x0: bool = False,
              eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
              return_x0: bool = False):
    """One fused DDIM step x_t → x_{t_prev} (same conventions as `shared.ddim_step`).

    Tensors as in `ddpm_step`; noise is needed when σ > 0 (η > 0 and t_prev ≥ 0). t_prev = −1 lands
    on x̂0. With clip_x0, x̂0 is clamped to [−1, 1] and ε̃ recomputed from it before the direction term.
    Returns x_{t_prev}, or (x_{t_prev}, x0_pred) with return_x0, in x_t's dtype.
    """
    _check_guidance_scale(guidance_scale)
    c = ddim_coefs(schedule, t, t_prev, eta)
    x_t, eps, eps_uncond, noise = _prepare(x_t, eps, eps_uncond, noise, c["sigma"])
    x_prev, x0_pred = torch.ops.sampling_step.ddim_step(
        x_t, eps, eps_uncond, noise, float(guidance_scale), c["sqrt_recip_alphas_cumprod"],
        c["sqrt_recipm1_alphas_cumprod"], c["sqrt_alphas_cumprod_prev"], c["direction_coef"],
        c["sigma"], bool(clip_x0), bool(return_x0))
    return _result(x_prev, x0_pred, return_x0)
