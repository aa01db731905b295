"""Seeds and per-sample noise.

`per_sample_noise` makes image i depend only on its own seed, never on the batch it is drawn in:
each sample gets its own torch.Generator, so sample i with seed s is the same at batch 1 or 1024.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def per_sample_noise(seeds: Sequence[int], shape_chw: Sequence[int], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, generator_offset: int = 0) -> torch.Tensor:
    """Standard normal noise of shape (len(seeds), *shape_chw), row i drawn from seed seeds[i] alone.

    `generator_offset` selects an independent stream for the same seed (e.g. the step index of a
    sampler, so x_T and each step's fresh noise differ). Drawn on the CPU in float32, then moved, so the
    values are identical on every device.
    """
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(_mix(int(seed), int(generator_offset)))
        rows.append(torch.randn(tuple(shape_chw), generator=gen))
    return torch.stack(rows).to(device=device, dtype=dtype)


def _mix(seed: int, offset: int) -> int:
    """Combines a seed and a stream index into one 63-bit generator seed (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + offset * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)
