"""Fused kernels for the diffusion model, each beside its eager PyTorch reference.

One folder per op, each holding the kernel, the torch.library op and the eager reference:

    kernels/group_norm/        GroupNorm + FiLM + SiLU   kernel.py (Triton), op.py, reference.py
    kernels/flash_attention/   softmax(q kᵀ/√d) v        kernel.py (Triton), op.py, reference.py
    kernels/sampling_step/     DDPM / DDIM update        csrc/ (C++ and CUDA), op.py; its formulas and
                                                         eager reference live in shared/diffusion
    kernels/triton_common.py   what the Triton ops share (device guard, dtype checks, interpreter flag,
                               buffers, the dot helper, the pinned launch configurations)

The entry points:

    kernels.group_norm_film_silu   fused GroupNorm + FiLM + SiLU      (kernels.reference has the eager one)
    kernels.attention              fused flash attention              (kernels.reference has the eager one)
    kernels.ddpm_step / ddim_step  fused sampler update      (shared.diffusion.steps.ddpm_update /
                                                                 ddim_update are the eager ones)

The fused entry points load lazily on first use, so `import kernels` never imports Triton or builds the
C++ extension (Triton's CPU interpreter must be chosen, with TRITON_INTERPRET=1, before Triton is first
imported). When one cannot be loaded, FusedKernelsUnavailable says why; nothing falls back silently.
Every custom op lives in the torch.library namespace OP_NAMESPACE. This package imports torch and
Triton only, never the `shared` core that uses it.
"""
from __future__ import annotations

import importlib

from kernels import reference
from kernels.build import OP_NAMESPACE

# Marks this package as the project's: the package index has another `kernels`, and the core checks this
# before using it (shared.errors).
__ddpm_from_scratch__ = True

__all__ = ["reference", "FusedKernelsUnavailable", "OP_NAMESPACE", "group_norm_film_silu", "attention",
           "ddpm_step", "ddim_step", "load"]

_FUSED = {
    "group_norm_film_silu": "kernels.group_norm.op",
    "attention": "kernels.flash_attention.op",
    "ddpm_step": "kernels.sampling_step.op",
    "ddim_step": "kernels.sampling_step.op",
}


class FusedKernelsUnavailable(RuntimeError):
    """A fused kernel was asked for but cannot run here; the message says what is missing.

    The scripts report it as one line, like a mistake in their input (`shared.errors.USER_ERRORS`).
    """


def load(name: str):
    """Returns the fused implementation `name`, importing its module on first use."""
    module_name = _FUSED[name]
    try:
        module = importlib.import_module(module_name)
    except FusedKernelsUnavailable:
        raise
    except Exception as err:  # ImportError, or whatever a backend raises while loading (a Triton or build error)
        raise FusedKernelsUnavailable(
            f"fused kernel {name!r} is unavailable: importing {module_name} failed "
            f"({type(err).__name__}: {err})") from err
    fn = getattr(module, name)
    globals()[name] = fn  # later lookups skip __getattr__
    return fn


def __getattr__(name: str):
    if name in _FUSED:
        return load(name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
