"""Seeds and per-sample noise from a counter-based generator (Philox4x32-10) on the device.

Sample i with seed s draws its noise for stream k (x_T is stream 0, sampler step j draws stream
j + 1) from Philox4x32-10 keyed by s, counter (block, 0, k, 0), and Box-Muller in float64 rounded
once to float32 (kernels/sampling_step/philox_reference.py states the generator). Every value is a
pure function of (seed, stream, element index): the noise of image i never depends on the batch it is
drawn in, nor on the other samples, and a whole batch is made on the output's device in one pass,
with no host copy.

Two implementations make these values:

    op         torch.ops.diffusion_kernels.philox_normal (C++/CUDA, kernels/sampling_step/philox_op.py):
               used whenever the extension is built for the device
    eager      the reference in tensor ops (or, compiled=True, fused by torch.compile): used otherwise

They agree bitwise but for about one value in 10⁶, which differs by one float32 ulp (the op computes
its own float64 log and sincos; the reference uses torch's). Within one implementation every value is
bitwise the same at any batch size, and the op's values are bitwise the same on CPU and CUDA.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch

from kernels.sampling_step import philox_op
from kernels.sampling_step.philox_reference import philox_normal
from shared.errors import UserError

MAX_SEED = 2**63 - 1  # seeds travel as int64 on the device
# Stream 0 of a sample's seed draws x_T; the samplers number the other streams after it.
X_T_STREAM = 0
#: per_sample_noise's implementations: the op when built, else eager (module docstring).
NOISE_IMPLS = ("auto", "op", "eager", "compiled")


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seeds_tensor(seeds: Sequence[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Seeds as int64 [N] on device, each checked in [0, 2⁶³)."""
    if torch.is_tensor(seeds):
        return seeds.to(device=device, dtype=torch.int64).reshape(-1)
    values = [int(s) for s in seeds]
    bad = [s for s in values if not 0 <= s <= MAX_SEED]
    if bad:
        raise UserError(f"seeds must lie in [0, 2^63 - 1], got {bad[0]}")
    return torch.tensor(values, dtype=torch.int64, device=device)


def noise_impl(device: torch.device | str, impl: str = "auto") -> str:
    """The implementation per_sample_noise runs on device: impl itself, or for "auto" the op when it
    is built for that device, else "eager". Asking for "op" where it is not built is a ValueError."""
    if impl not in NOISE_IMPLS:
        raise ValueError(f"unknown noise implementation {impl!r}; choose one of {', '.join(NOISE_IMPLS)}")
    if impl == "auto":
        return "op" if philox_op.available(device) else "eager"
    if impl == "op" and not philox_op.available(device):
        raise ValueError(f"the philox_normal op is not built for {torch.device(device).type}; build the "
                         "extension with `pip install --no-build-isolation -e .`")
    return impl


def per_sample_noise(seeds: Sequence[int] | torch.Tensor, shape_chw: Sequence[int],
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     stream: int | torch.Tensor = 0, compiled: bool = False, impl: str = "auto") -> torch.Tensor:
    """Standard normal noise [len(seeds) x *shape_chw], row i a function of (seeds[i], stream) alone.

    `stream` selects an independent sequence for the same seed (x_T is stream 0, step j of a sampler
    stream j + 1): an int, or an int64 tensor of one element on `device`. Made on `device` in one pass
    by `impl` (NOISE_IMPLS; module docstring); compiled=True is impl="compiled", the reference fused
    by torch.compile. Every call of one sampling run resolves "auto" the same way.
    """
    seeds = seeds_tensor(seeds, device)
    shape_chw = [int(d) for d in shape_chw]
    impl = noise_impl(seeds.device, "compiled" if compiled else impl)
    if impl == "op":
        noise = philox_op.philox_normal(seeds, stream, shape_chw)
    else:
        numel = math.prod(shape_chw)
        noise = philox_normal(seeds, stream, numel, impl == "compiled").reshape(seeds.shape[0], *shape_chw)
    return noise.to(dtype)
