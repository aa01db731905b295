"""The forward (noising) process q(x_t | x_0) in closed form."""
from __future__ import annotations

import torch

from shared.schedule import NoiseSchedule, extract


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: int | torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Draws x_t ~ q(x_t | x_0) = N(√ᾱ_t x0, (1 − ᾱ_t) I) by reparameterisation (DDPM Eq. 4):

        x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε,   ε ~ N(0, I).

    x0, noise: [N x C x H x W] (any shape with the batch first).  t: an int or a LongTensor [N].
    Returns x_t in x0's dtype.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + \
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise.to(x0.dtype)
