"""The eager PyTorch sampler update: the ground truth of the fused op (kernels/sampling_step/csrc), and
what shared.diffusion.steps runs.

`step` takes the scalars of kernels/sampling_step/coefficients.py and does, with tensor ops in x_t's
dtype (each scalar rounded once to that dtype, as the schedule's `extract` does):

    ε̃  = ε_u + w·(ε_c − ε_u)  when ε_u is given, else ε_c        (Ho & Salimans 2022, Eq. 6)
    x̂0 = x0_coef_xt·x_t − x0_coef_eps·ε̃, clamped to [−1, 1] with clip_x0
    DDPM  x_prev = out_coef_x0·x̂0 + out_coef_rest·x_t + σ·z      (DDPM Eq. 7, Alg. 2)
    DDIM  x_prev = out_coef_x0·x̂0 + out_coef_rest·ε̃ + σ·z        (DDIM Eq. 12); with clip_x0, ε̃ is
          first recomputed from the clipped x̂0, ε̃ = (x0_coef_xt·x_t − x̂0) / x0_coef_eps, so the
          direction term points at the image actually predicted

The fused op does the same arithmetic in fp32 whatever the storage dtype, so for fp32 inputs the two
agree to rounding, and for half inputs the op is the more accurate one.
"""
from __future__ import annotations

import torch

from kernels.sampling_step.coefficients import StepCoefficients

MODES = ("ddpm", "ddim")


def _coef(value, x_t: torch.Tensor) -> torch.Tensor:
    """A scalar as a tensor in x_t's dtype that broadcasts against x_t: [1, 1, …] for a float (filled
    from the Python value: no host-to-device copy), [N, 1, …] for a float64 tensor [N]."""
    view = [1] * x_t.ndim
    if torch.is_tensor(value):
        view[0] = value.shape[0]
        return value.to(device=x_t.device, dtype=x_t.dtype).reshape(view)
    return torch.full(view, value, dtype=x_t.dtype, device=x_t.device)


def _is_zero(value) -> bool:
    return not torch.is_tensor(value) and value == 0.0


def step(mode: str, x_t: torch.Tensor, eps: torch.Tensor, coefs: StepCoefficients,
         noise: torch.Tensor | None = None, clip_x0: bool = False,
         eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM or DDIM update; returns (x_prev, x0_pred), both [N x C x H x W] in x_t's dtype.

    x_t, eps (ε_c), eps_uncond (ε_u), noise (z): [N x C x H x W]. noise None drops the σ·z term (so
    does a σ that is the Python float 0: DDPM at t = 0, DDIM with η = 0).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    eps = eps.to(x_t.dtype)
    if eps_uncond is not None:
        eps_uncond = eps_uncond.to(x_t.dtype)
        eps = eps_uncond + guidance_scale * (eps - eps_uncond)
    x0_coef_xt, x0_coef_eps = _coef(coefs.x0_coef_xt, x_t), _coef(coefs.x0_coef_eps, x_t)
    x0_pred = x0_coef_xt * x_t - x0_coef_eps * eps
    if clip_x0:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
    if mode == "ddpm":
        rest = x_t
    else:
        rest = (x0_coef_xt * x_t - x0_pred) / x0_coef_eps if clip_x0 else eps
    x_prev = _coef(coefs.out_coef_x0, x_t) * x0_pred + _coef(coefs.out_coef_rest, x_t) * rest
    if noise is not None and not _is_zero(coefs.sigma):
        x_prev = x_prev + _coef(coefs.sigma, x_t) * noise.to(x_t.dtype)
    return x_prev, x0_pred
