"""Fused GPU kernels and their eager PyTorch references.

    kernels.reference.group_norm_film_silu / kernels.reference.attention   eager ground truth
    kernels.group_norm_film_silu   Triton GroupNorm + FiLM + SiLU            (kernels/triton_group_norm.py)
    kernels.attention              Triton flash attention                    (kernels/triton_attention.py)
    kernels.ddpm_step / ddim_step  C++/CUDA fused sampler update             (kernels/sampling_step.py)

The fused entry points load lazily on first use, so `import kernels` never imports Triton or builds the
C++ extension (Triton's CPU interpreter must be chosen, with TRITON_INTERPRET=1, before Triton is first
imported). When one cannot be loaded, FusedKernelsUnavailable says why; nothing falls back silently.
"""
from __future__ import annotations

import importlib

from kernels import reference

__all__ = ["reference", "FusedKernelsUnavailable", "group_norm_film_silu", "attention",
           "ddpm_step", "ddim_step", "load"]

_FUSED = {
    "group_norm_film_silu": "kernels.triton_group_norm",
    "attention": "kernels.triton_attention",
    "ddpm_step": "kernels.sampling_step",
    "ddim_step": "kernels.sampling_step",
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
