"""Fused DDPM / DDIM sampling update: one pass over memory per step (a C++/CUDA custom op).

`ddpm_step` and `ddim_step` are the fused twins of the eager updates `shared.diffusion.steps.ddpm_update`
and `ddim_update`, with the same signature and the same math: they take the per-step scalars that
`shared.diffusion.coefficients` computes from the float64 schedule (five Python floats, in the order of
its StepCoefficients) and do the element-wise work in fp32 whatever the storage dtype (float32,
float16, bfloat16), with classifier-free guidance and optionally the noise folded in. The formulas
live in shared/diffusion; this package only implements them fast, and tests/test_sampling_step_ext.py
checks it against that home.

Layers and their errors:
- the op (torch.ops.diffusion_kernels.ddpm_step / ddim_step) checks shapes, dtypes, devices,
  contiguity and that noise is given when σ > 0 with TORCH_CHECK (a RuntimeError);
- these wrappers check the scalars and the noise arguments first (ValueError), and pass every tensor
  through `.contiguous()`, so non-contiguous inputs work here at the cost of a copy;
- loading: the module built by setup.py (kernels.sampling_step._C) is imported; if it is absent, or
  older than its sources (an edit without a rebuild), it is built once with
  torch.utils.cpp_extension.load and cached, one folder per Python and torch version
  (kernels.build.jit_build_directory, under TORCH_EXTENSIONS_DIR); if that fails,
  `FusedKernelsUnavailable` names what is missing. There is no silent fallback to the eager step.

Unlike the eager updates, which drop the σ·z term when noise is None, a missing noise where σ > 0 is an
error here: a fused sampler always has its noise at hand, so a missing one is a bug to report.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Sequence

import torch

from kernels import OP_NAMESPACE, FusedKernelsUnavailable, build
from kernels.sampling_step import philox_op
from kernels.sampling_step.philox_reference import stream_tensor

__all__ = ["ddpm_step", "ddim_step", "InKernelNoise", "load_extension", "NUM_COEFFICIENTS"]

#: x0_coef_xt, x0_coef_eps, out_coef_x0, out_coef_rest, sigma (shared.diffusion.coefficients)
NUM_COEFFICIENTS = 5


@dataclasses.dataclass(frozen=True)
class InKernelNoise:
    """z of a step drawn inside the fused step: the values of
    per_sample_noise(seeds, x_t.shape[1:], stream=stream) (shared.diffusion.noise), without a pass of their own."""

    seeds: torch.Tensor        # int64 [N] on x_t's device
    stream: int | torch.Tensor  # an int, or an int64 tensor of one element there


# --------------------------------------------------------------------------------------------------
# Loading the compiled op


@functools.cache
def load_extension():
    """Imports (or JIT-builds, once) the extension and registers the fake kernels; returns the module."""
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


def _fake_step(x_t, eps, eps_uncond, noise, *rest, **keywords):
    """Shapes only, for torch.compile: x_prev like x_t, x0_pred like x_t or an empty [0] tensor.

    rest: the schema's guidance_scale, five coefficients, clip_x0, return_x0 (then noise_seeds and noise_stream,
    positional or in keywords)."""
    for name, other in (("eps", eps), ("eps_uncond", eps_uncond), ("noise", noise)):
        if other is not None:
            torch._check(other.shape == x_t.shape, lambda: f"{name} shape must match x_t")
            torch._check(other.dtype == x_t.dtype, lambda: f"{name} dtype must match x_t")
    return_x0 = rest[NUM_COEFFICIENTS + 2]
    x0_pred = torch.empty_like(x_t) if return_x0 else x_t.new_empty((0,))
    return torch.empty_like(x_t), x0_pred


def _register_fakes() -> None:
    for op in ("ddpm_step", "ddim_step"):
        torch.library.register_fake(f"{OP_NAMESPACE}::{op}")(_fake_step)
    philox_op.register_fake()


# --------------------------------------------------------------------------------------------------
# Public wrappers


def _check_scalars(coefs: Sequence[float], guidance_scale: float) -> tuple[float, ...]:
    """The five step scalars as finite Python floats (one set for the whole batch), or a ValueError."""
    if len(coefs) != NUM_COEFFICIENTS:
        raise ValueError(f"the fused step takes {NUM_COEFFICIENTS} coefficients, got {len(coefs)}")
    if any(torch.is_tensor(c) for c in coefs):
        raise ValueError("the fused step takes one set of coefficients for the whole batch (Python floats, "
                         "from an int timestep), not per-sample tensors")
    values = tuple(float(c) for c in coefs)
    if not all(math.isfinite(v) for v in values + (float(guidance_scale),)):
        raise ValueError(f"the step's coefficients and guidance_scale must be finite, got {values}, {guidance_scale}")
    return values


def _noise_args(x_t: torch.Tensor, noise, sigma: float) -> tuple:
    """(noise tensor or None, seeds or None, stream tensor or None) as the op takes them."""
    if isinstance(noise, InKernelNoise):
        return None, noise.seeds.contiguous(), stream_tensor(noise.stream, x_t.device)
    if sigma > 0 and noise is None:
        raise ValueError(f"noise is required for this step (sigma = {sigma:.3g} > 0: DDPM at t > 0 or DDIM with "
                         "eta > 0); pass noise of x_t's shape, or an InKernelNoise")
    return (None if noise is None else noise.contiguous()), None, None


def _fused(name: str, x_t, eps, coefs, noise, clip_x0, guidance: tuple, return_x0: bool):
    """torch.ops.<OP_NAMESPACE>.<name> on checked arguments; guidance: (eps_uncond or None, w)."""
    eps_uncond, guidance_scale = guidance
    module = load_extension()
    if x_t.device.type == "cuda" and not module.with_cuda:
        raise FusedKernelsUnavailable(
            "the sampling-step extension was built without CUDA (no CUDA toolkit at build time), but "
            "x_t is on the GPU; set CUDA_HOME to the toolkit and rebuild, or run on the CPU")
    scalars = _check_scalars(coefs, guidance_scale)
    z, seeds, stream = _noise_args(x_t, noise, scalars[-1])
    uncond = None if eps_uncond is None else eps_uncond.contiguous()
    op = getattr(getattr(torch.ops, OP_NAMESPACE), name)
    x_prev, x0_pred = op(x_t.contiguous(), eps.contiguous(), uncond, z, float(guidance_scale), *scalars,
                         bool(clip_x0), bool(return_x0), seeds, stream)
    return x_prev, (x0_pred if return_x0 else None)


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, coefs: Sequence[float],
              noise: torch.Tensor | InKernelNoise | None = None, clip_x0: bool = False,
              eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, return_x0: bool = True):
    """The fused `shared.diffusion.steps.ddpm_update`: x_prev = c1·x̂0 + c2·x_t + σ·z (DDPM Eq. 7, Alg. 2).

    x_t, eps (ε_c), eps_uncond (ε_u, optional), noise (z, needed when σ > 0): [N x C x H x W] (any
    shape, all equal), float32/float16/bfloat16, one device; noise may be an InKernelNoise instead.
    coefs: (x0_coef_xt, x0_coef_eps, out_coef_x0, out_coef_rest, sigma) as Python floats. With
    eps_uncond, ε̃ = ε_u + guidance_scale·(ε_c − ε_u). Returns (x_prev, x̂0, or None unless return_x0).
    """
    return _fused("ddpm_step", x_t, eps, coefs, noise, clip_x0, (eps_uncond, guidance_scale), return_x0)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, coefs: Sequence[float],
              noise: torch.Tensor | InKernelNoise | None = None, clip_x0: bool = False,
              eps_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, return_x0: bool = True):
    """The fused `shared.diffusion.steps.ddim_update`: x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̃ + σ·z
    (DDIM Eq. 12); with clip_x0, ε̃ is recomputed from the clamped x̂0 first. Arguments as `ddpm_step`."""
    return _fused("ddim_step", x_t, eps, coefs, noise, clip_x0, (eps_uncond, guidance_scale), return_x0)
