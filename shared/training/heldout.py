"""The held-out denoising loss: L_simple of the EMA weights on images kept out of training, with t and ε
drawn once from their own seed, so every evaluation measures the same problem and losses compare."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from shared.diffusion.schedule import NoiseSchedule
from shared.errors import UserError
from shared.training.loss import l_simple

HELDOUT_NOISE_SEED_OFFSET = 1_000_003   # held-out t and ε come from their own stream, never the training one


def split_heldout(dataset: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part of `size` images), chosen by a permutation fixed by `seed`."""
    n = len(dataset)
    if size == 0:
        return dataset, None
    if size >= n:
        raise UserError(f"--heldout-size {size} leaves no training images (the dataset has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[size:]), Subset(dataset, order[:size])


def fixed_heldout_batch(heldout: Dataset, num_timesteps: int, seed: int, device: torch.device):
    """(x0 [N x C x H x W], y [N], t [N], ε like x0) on `device`: the held-out images with t and ε drawn once."""
    items = [heldout[i] for i in range(len(heldout))]  # each image read (and decoded) once
    x0 = torch.stack([image for image, _ in items])
    y = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed + HELDOUT_NOISE_SEED_OFFSET)
    t = torch.randint(0, num_timesteps, (len(heldout),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0.to(device), y.to(device), t.to(device), noise.to(device)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, schedule: NoiseSchedule, batch, class_cond: bool, batch_size: int,
                 autocast) -> float:
    """L_simple of `model` (in eval mode) on the fixed held-out (x0, y, t, ε), averaged over images."""
    x0, y, t, noise = batch
    total = torch.zeros((), device=x0.device)
    for s in range(0, x0.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        total += l_simple(model, schedule, x0[sl], y[sl] if class_cond else None, t[sl], noise[sl],
                          autocast=autocast).sum()
    return total.item() / x0.shape[0]  # one read per evaluation
