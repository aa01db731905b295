"""Exponential moving average (EMA) of the weights, with a warm-up of the decay.

Built on torch.optim.swa_utils: `AveragedModel` keeps the averaged copy (and its update counter
`n_averaged`, so the average resumes exactly from a checkpoint) and `get_ema_multi_avg_fn` does the
foreach update

    θ_ema ← decay_n · θ_ema + (1 − decay_n) · θ            (one torch._foreach_lerp_ over all tensors)

The first update copies θ. A fixed decay of 0.999 would keep the random initial weights in the
average for thousands of steps, so the decay warms up as in TensorFlow's ExponentialMovingAverage
with `num_updates`:

    decay_n = min(decay, (1 + n) / (warmup + n)),   n = updates so far (n_averaged)

warmup = 10 gives decay_1 ≈ 0.18, decay_90 = 0.91, and reaches 0.999 near n = 9,000; warmup = 0 turns
the warm-up off.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

DEFAULT_EMA_DECAY = 0.999
DEFAULT_EMA_WARMUP = 10


def ema_decay_at(num_updates: int, decay: float, warmup: int) -> float:
    """decay_n for the update that follows `num_updates` earlier ones (see the module docstring)."""
    if warmup <= 0:
        return decay
    return min(decay, (1.0 + num_updates) / (warmup + num_updates))


def warmup_ema_multi_avg_fn(decay: float, warmup: int):
    """A multi_avg_fn for AveragedModel: get_ema_multi_avg_fn with the decay of update n."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema_params, model_params, num_averaged: torch.Tensor) -> None:
        decay_n = ema_decay_at(int(num_averaged), decay, warmup)
        get_ema_multi_avg_fn(decay_n)(ema_params, model_params, num_averaged)

    return update


def make_ema(model: torch.nn.Module, decay: float = DEFAULT_EMA_DECAY,
             warmup: int = DEFAULT_EMA_WARMUP) -> AveragedModel:
    """A frozen EMA copy of `model` (pass the plain module, not a DDP or compiled wrapper).

    use_buffers=True averages buffers too, so the EMA network is self-contained. Call
    `ema.update_parameters(model)` after every optimizer step.
    """
    ema = AveragedModel(model, multi_avg_fn=warmup_ema_multi_avg_fn(decay, warmup), use_buffers=True)
    ema.requires_grad_(False)
    ema.eval()  # evaluation and sampling use it: dropout off
    return ema
