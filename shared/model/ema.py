"""Exponential moving average (EMA) of the weights, with a warm-up of the decay, updated on the device.

    θ_ema ← θ_ema + (1 − decay_n) · (θ − θ_ema)            (foreach kernels over all tensors)

The first update copies θ. A fixed decay of 0.999 would keep the random initial weights in the
average for thousands of steps, so the decay warms up as in TensorFlow's ExponentialMovingAverage
with `num_updates`:

    decay_n = min(decay, (1 + n) / (warmup + n)),   n = updates so far (n_averaged)

warmup = 10 gives decay_1 ≈ 0.18, decay_90 = 0.91, and reaches 0.999 near n = 9,000; warmup = 0 turns
the warm-up off.

`EMA` is a torch.optim.swa_utils.AveragedModel (same state_dict: `module.*` and the update counter
`n_averaged`, so checkpoints of either load in both), whose update never reads a value back to the
host: decay_n is computed from the counter on the device, and an update can be masked by a device flag
(a skipped training step), so a training step with an EMA update needs no host sync.
"""
from __future__ import annotations

import itertools

import torch
from torch.optim.swa_utils import AveragedModel

DEFAULT_EMA_DECAY = 0.999
DEFAULT_EMA_WARMUP = 10


def ema_decay_at(num_updates: int, decay: float, warmup: int) -> float:
    """decay_n for the update that follows `num_updates` earlier ones (see the module docstring).

    The host-side reference of what EMA.update_parameters computes on the device (for n ≥ 1)."""
    if warmup <= 0:
        return decay
    return min(decay, (1.0 + num_updates) / (warmup + num_updates))


class EMA(AveragedModel):
    """A frozen EMA copy of a network; buffers are averaged too, so the copy is self-contained."""

    def __init__(self, model: torch.nn.Module, decay: float = DEFAULT_EMA_DECAY, warmup: int = DEFAULT_EMA_WARMUP):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        # the update counter lives beside the weights: AveragedModel would put it on the CPU, and the
        # device-side update (n_averaged += ~skip) needs it on the model's device
        device = next(itertools.chain(model.parameters(), model.buffers())).device
        super().__init__(model, device=device, use_buffers=True)
        self.decay, self.warmup = float(decay), int(warmup)
        self.requires_grad_(False)
        self.eval()  # evaluation and sampling use it: dropout off

    def decay_now(self) -> torch.Tensor:
        """decay_n of the next update as a 0-dim float32 device tensor; 0 for the first (a copy)."""
        n = self.n_averaged.float()
        decay = torch.full_like(n, self.decay)
        if self.warmup > 0:
            decay = torch.minimum(decay, (1.0 + n) / (self.warmup + n))
        return torch.where(n == 0, torch.zeros_like(n), decay)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module, skip: torch.Tensor | None = None) -> None:
        """θ_ema ← lerp(θ_ema, θ, 1 − decay_n), unless the 0-dim bool device tensor `skip` is true.

        A skipped update leaves θ_ema and n_averaged exactly as they were (weight 0: θ_ema + 0·(θ − θ_ema)
        for finite θ) without the host ever reading `skip`.
        """
        weight = 1.0 - self.decay_now()
        if skip is not None:
            weight = torch.where(skip, torch.zeros_like(weight), weight)
        averaged = [t for t in itertools.chain(self.module.parameters(), self.module.buffers())
                    if t.is_floating_point()]
        current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
        if len(averaged) != len(current):
            raise ValueError("the EMA copy and the model have different tensors")
        # (_foreach_lerp_ would turn a tensor weight into a host Scalar, a sync; mul_ keeps it a tensor)
        deltas = torch._foreach_sub(current, averaged)
        torch._foreach_mul_(deltas, weight)
        torch._foreach_add_(averaged, deltas)
        self.n_averaged += 1 if skip is None else (~skip).long()


def make_ema(model: torch.nn.Module, decay: float = DEFAULT_EMA_DECAY, warmup: int = DEFAULT_EMA_WARMUP) -> EMA:
    """A frozen EMA copy of `model` (pass the plain module, not a DDP or compiled wrapper).

    Call `ema.update_parameters(model)` after every optimizer step.
    """
    return EMA(model, decay, warmup)
