"""The per-sample noise op: torch.ops.diffusion_kernels.philox_normal (csrc/philox_normal.cpp, the
CUDA kernel in csrc/cuda/philox_normal.cu, the math in csrc/philox.h), its fake kernel, and
`philox_normal`, the typed entry point.

The op makes the values of kernels/sampling_step/philox_reference.py (the same generator; see that
module for the bound on their differences) in one pass, one vector of Philox blocks per step on the CPU
(at::parallel_for over tiles of samples) and one thread per block of 4 values on the GPU, reading the
stream from a device tensor so CUDA graphs can replay it with a new stream.

`available(device)` says whether the op can run on a device without building anything: the
extension built in place by setup.py is imported when it is current (not older than its sources), or
the op is already registered (the sampling step's JIT build loaded it). Noise is drawn on every
sampling run, so a missing build falls back to the reference (shared.diffusion.noise) instead of
compiling for minutes.
"""
from __future__ import annotations

import functools
import importlib

import torch

from kernels import OP_NAMESPACE, build
from kernels.sampling_step.philox_reference import MAX_BLOCKS, stream_tensor

OP = f"{OP_NAMESPACE}::philox_normal"


@functools.cache
def register_fake() -> None:
    """The fake kernel (shapes only, for torch.compile), registered once whichever path loaded the op."""
    @torch.library.register_fake(OP)
    def _fake(seeds, stream, sample_shape):
        return seeds.new_empty((seeds.shape[0], *sample_shape), dtype=torch.float32)


@functools.cache
def _import_prebuilt() -> bool:
    """Imports setup.py's in-place module when it is current; True when that worked."""
    if build.prebuilt_is_stale():
        return False
    try:
        importlib.import_module(build.EXTENSION_NAME)
    except ImportError:
        return False
    return True


def _registered(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (key is not None and torch._C._dispatch_has_kernel(OP)
            and torch._C._dispatch_has_kernel_for_dispatch_key(OP, key))


def available(device: torch.device | str) -> bool:
    """Whether the compiled op runs on `device` now (never builds; module docstring)."""
    device_type = torch.device(device).type
    if not _registered(device_type):
        _import_prebuilt()
        if not _registered(device_type):
            return False
    register_fake()
    return True


def philox_normal(seeds: torch.Tensor, stream: int | torch.Tensor, sample_shape) -> torch.Tensor:
    """Standard normals [N x *sample_shape], float32, on seeds' device: row i from (seeds[i], stream).

    seeds: int64 [N] in [0, 2⁶³); stream: an int in [0, 2³²) or an int64 tensor of one element on
    seeds' device. Call `available(seeds.device)` first; the op raises a RuntimeError for bad inputs.
    """
    sample_shape = [int(d) for d in sample_shape]
    numel = 1
    for d in sample_shape:
        numel *= d
    if -(-numel // 4) > MAX_BLOCKS:
        raise ValueError(f"{numel} elements per sample exceed the generator's 2^34 per stream")
    stream = stream_tensor(stream, seeds.device).to(torch.int64)
    return getattr(torch.ops, OP_NAMESPACE).philox_normal(seeds.contiguous(), stream, sample_shape)
