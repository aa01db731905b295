"""Fused DDPM / DDIM sampling update: one pass over memory per step (a C++/CUDA custom op).

`ddpm_step` and `ddim_step` take the arguments of the eager steps (`shared.diffusion.steps`) plus
`eps_uncond=None, guidance_scale=1.0` (classifier-free guidance fused in) and `return_x0`. The per-step
scalars come from kernels/sampling_step/coefficients.py (float64, the same as the eager steps use);
the op (csrc/) does the element-wise work of kernels/sampling_step/reference.py in fp32 whatever the
storage dtype (float32, float16, bfloat16).

Layers and their errors:
- the op (torch.ops.diffusion_kernels.ddpm_step / ddim_step) checks shapes, dtypes, devices,
  contiguity and that noise is given when σ > 0 with TORCH_CHECK (a RuntimeError);
- these wrappers check t, t_prev, η, variance and missing noise first (ValueError), and pass every
  tensor through `.contiguous()`, so non-contiguous inputs work here at the cost of a copy;
- loading: the module built by setup.py (kernels.sampling_step._C) is imported; if it is absent, or
  older than its sources (an edit without a rebuild), it is built once with
  torch.utils.cpp_extension.load and cached (TORCH_EXTENSIONS_DIR); if that fails,
  `FusedKernelsUnavailable` names what is missing. There is no silent fallback to the eager step.

Unlike the eager steps, which drop the σ·z term when noise is None, a missing noise where σ > 0 is an
error here: a fused sampler always has its noise at hand, so a missing one is a bug to report.
"""
from __future__ import annotations

import functools
import importlib
import math

import torch

from kernels import OP_NAMESPACE, FusedKernelsUnavailable
from kernels.sampling_step.coefficients import (VARIANCES, StepCoefficients, check_eta, check_timestep,
                                                check_timestep_order, check_variance, ddim_coefficients,
                                                ddpm_coefficients, single_timestep)
from kernels.sampling_step.philox_reference import stream_tensor

__all__ = ["ddpm_step", "ddim_step", "ddpm_op_coefficients", "ddim_op_coefficients", "load_extension",
           "VARIANCES"]


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
               clip_x0, return_x0, noise_seeds=None, noise_stream=None):
    """Shapes only, for torch.compile: x_prev like x_t, x0_pred like x_t or an empty [0] tensor."""
    for name, other in (("eps", eps), ("eps_uncond", eps_uncond), ("noise", noise)):
        if other is not None:
            torch._check(other.shape == x_t.shape, lambda: f"{name} shape must match x_t")
            torch._check(other.dtype == x_t.dtype, lambda: f"{name} dtype must match x_t")
    x0_pred = torch.empty_like(x_t) if return_x0 else x_t.new_empty((0,))
    return torch.empty_like(x_t), x0_pred


def _register_fakes() -> None:
    for op in ("ddpm_step", "ddim_step"):
        torch.library.register_fake(f"{OP_NAMESPACE}::{op}")(_fake_step)
    from kernels.sampling_step import philox_op

    philox_op.register_fake()


# --------------------------------------------------------------------------------------------------
# Per-step scalars: one value of t for the whole batch, Python floats


def _check_guidance_scale(guidance_scale: float) -> None:
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")


def ddpm_op_coefficients(schedule, t, variance: str, batch_size: int) -> StepCoefficients:
    """The op's scalars of one DDPM step at t: an int, or a tensor [batch_size] holding one value."""
    check_variance(variance)
    check_timestep(t, "t", schedule.num_timesteps, 0, batch_size)
    return ddpm_coefficients(schedule, single_timestep(t, "t"), variance)


def ddim_op_coefficients(schedule, t, t_prev, eta: float, batch_size: int) -> StepCoefficients:
    """The op's scalars of one DDIM step t → t_prev (t_prev = −1 lands on x̂0), t and t_prev as above."""
    check_eta(eta)
    check_timestep(t, "t", schedule.num_timesteps, 0, batch_size)
    check_timestep(t_prev, "t_prev", schedule.num_timesteps, -1, batch_size)
    t, t_prev = single_timestep(t, "t"), single_timestep(t_prev, "t_prev")
    check_timestep_order(t, t_prev)
    return ddim_coefficients(schedule, t, t_prev, float(eta))


# --------------------------------------------------------------------------------------------------
# Public wrappers


def _prepare(x_t, eps, eps_uncond, noise, sigma: float, noise_seeds, noise_stream):
    """Checks, then (x_t, eps, eps_uncond, noise, noise_seeds, noise_stream) as the op takes them."""
    module = load_extension()
    if x_t.device.type == "cuda" and not module.with_cuda:
        raise FusedKernelsUnavailable(
            "the sampling-step extension was built without CUDA (no CUDA toolkit at build time), but "
            "x_t is on the GPU; set CUDA_HOME to the toolkit and rebuild, or run on the CPU")
    if (noise_seeds is None) != (noise_stream is None):
        raise ValueError("noise_seeds and noise_stream go together (in-kernel noise); pass both or neither")
    if noise is not None and noise_seeds is not None:
        raise ValueError("pass either noise or noise_seeds/noise_stream, not both")
    if sigma > 0 and noise is None and noise_seeds is None:
        raise ValueError(f"noise is required for this step (sigma = {sigma:.3g} > 0: DDPM at t > 0 or "
                         "DDIM with eta > 0); pass noise of x_t's shape, or noise_seeds and noise_stream")
    if noise_seeds is not None:
        noise_stream = stream_tensor(noise_stream, x_t.device)

    def contiguous(tensor):
        return None if tensor is None else tensor.contiguous()

    return (contiguous(x_t), contiguous(eps), contiguous(eps_uncond), contiguous(noise), contiguous(noise_seeds),
            noise_stream)


def _op(name: str):
    """torch.ops.<OP_NAMESPACE>.<name>, the compiled op."""
    return getattr(getattr(torch.ops, OP_NAMESPACE), name)


def _result(x_prev, x0_pred, return_x0: bool):
    return (x_prev, x0_pred) if return_x0 else x_prev


def ddpm_step(schedule, x_t: torch.Tensor, eps: torch.Tensor, t, noise: torch.Tensor | None = None,
              clip_x0: bool = False, variance: str = "fixed_small",
              eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
              return_x0: bool = False, noise_seeds: torch.Tensor | None = None,
              noise_stream: int | torch.Tensor | None = None):
    """One fused DDPM ancestral step x_t → x_{t−1} (same conventions as the eager step).

    x_t, eps (ε_c), eps_uncond (ε_u, optional), noise (z, needed for t > 0): [N x C x H x W] (any
    shape, all equal), float32/float16/bfloat16, one device. t: an int (or an integer tensor with one
    value) in [0, T). With eps_uncond, ε̃ = ε_u + guidance_scale·(ε_c − ε_u).
    noise_seeds (int64 [N] on x_t's device) with noise_stream (an int, or an int64 tensor of one
    element there), instead of noise: z is drawn in-kernel, the values of
    per_sample_noise(noise_seeds, x_t.shape[1:], stream=noise_stream).to(x_t.dtype).
    Returns x_{t−1}, or (x_{t−1}, x0_pred) with return_x0, in x_t's dtype.
    """
    _check_guidance_scale(guidance_scale)
    c = ddpm_op_coefficients(schedule, t, variance, x_t.shape[0])
    x_t, eps, eps_uncond, noise, noise_seeds, noise_stream = _prepare(x_t, eps, eps_uncond, noise, c.sigma,
                                                                      noise_seeds, noise_stream)
    x_prev, x0_pred = _op("ddpm_step")(x_t, eps, eps_uncond, noise, float(guidance_scale), *c,
                                       bool(clip_x0), bool(return_x0), noise_seeds, noise_stream)
    return _result(x_prev, x0_pred, return_x0)


def ddim_step(schedule, x_t: torch.Tensor, eps: torch.Tensor, t, t_prev, eta: float = 0.0,
              noise: torch.Tensor | None = None, clip_x0: bool = False,
              eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
              return_x0: bool = False, noise_seeds: torch.Tensor | None = None,
              noise_stream: int | torch.Tensor | None = None):
    """One fused DDIM step x_t → x_{t_prev} (same conventions as the eager step).

    Tensors as in `ddpm_step`; noise (or noise_seeds and noise_stream, as there) is needed when
    σ > 0 (η > 0 and t_prev ≥ 0). t_prev = −1 lands on x̂0. With clip_x0, x̂0 is clamped to [−1, 1]
    and ε̃ recomputed from it before the direction term.
    Returns x_{t_prev}, or (x_{t_prev}, x0_pred) with return_x0, in x_t's dtype.
    """
    _check_guidance_scale(guidance_scale)
    c = ddim_op_coefficients(schedule, t, t_prev, eta, x_t.shape[0])
    x_t, eps, eps_uncond, noise, noise_seeds, noise_stream = _prepare(x_t, eps, eps_uncond, noise, c.sigma,
                                                                      noise_seeds, noise_stream)
    x_prev, x0_pred = _op("ddim_step")(x_t, eps, eps_uncond, noise, float(guidance_scale), *c,
                                       bool(clip_x0), bool(return_x0), noise_seeds, noise_stream)
    return _result(x_prev, x0_pred, return_x0)
