"""The training step as one CUDA graph: `CounterDraws` (t, ε and the label dropout from a counter) and
`GraphedStep` (capture once, replay every step).

A GPU step of a small U-Net is a few hundred kernel launches of microseconds each, so the host's launch
work, not the GPU, sets the pace. A CUDA graph records the whole steady-state step once — forward,
backward, the gradient clip, fused AdamW, the EMA and the skip counters — and replays it with one launch.
Whatever changes from step to step must then live in device memory the graph reads:

    what                          where the graph reads it
    x0, y of each micro-batch     static input buffers, filled by copy_ before each replay
    the learning rate             a 0-dim device tensor GraphedStep puts in the optimizer's groups
                                  (AdamW capturable=True), filled with the schedule's value before
                                  each step (`sync_lr`)
    t, ε, the label dropout       `CounterDraws`: Philox noise keyed by (seed, row) at the counter
                                  stream step·K + k, the counter a device tensor the graph increments
    the skip flag, counters, EMA  device tensors updated in place (loop.GradientStep.update)

CounterDraws makes each image's draws a pure function of (seed, row, step, micro-batch), like the
samplers' per-sample noise (shared.diffusion.noise): two uniforms u and the C·H·W normals of ε come from
one Philox row, u = Φ(z) of two of its normals (Φ the standard normal CDF maps N(0, 1) onto U(0, 1)):

    t = ⌊u₁·T⌋ ~ Uniform{0, …, T−1},   y ← ∅ where u₂ < p_uncond,   ε ~ N(0, I)

A resumed run sets the counter to its step, so it draws what the uninterrupted run would have. The
draws differ from the eager step's torch.Generator draws, so a run keeps its way of drawing when resumed
(the option is recorded with the run).

`GraphedStep(step, capture=False)` runs the same work uncaptured, on any device: the CPU tests check
its draws, its host syncs (none) and its resume through it; on CUDA the tests hold the replay to it.
"""
from __future__ import annotations

import math

import torch

from shared.diffusion.noise import per_sample_noise

# Row i of a rank's batch draws with Philox key (seed·ROW_KEY_STRIDE + i) mod 2⁶³: a prime stride keeps
# the rows of different seeds (and ranks, whose seeds differ) apart.
ROW_KEY_STRIDE = 1_000_003
KEY_MODULUS = 2**63
# Uniforms per row, ahead of ε: u₁ for t, u₂ for the label dropout.
UNIFORMS = 2


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z) = ½·erfc(−z/√2), in z's dtype: maps standard normal values onto U(0, 1)."""
    return 0.5 * torch.erfc(-z * (0.5 ** 0.5))


class CounterDraws:
    """t, ε and the label dropout of a training step from Philox counters (module docstring).

    seed: this rank's seed; rows: the micro-batch size N; image_shape: (C, H, W); grad_accum: K
    micro-batches per step. `draw` reads the step counter from the device, `advance` increments it
    there, so neither needs the host.
    """

    def __init__(self, seed: int, rows: int, image_shape: tuple, num_timesteps: int, grad_accum: int,
                 device: torch.device):
        keys = [(seed * ROW_KEY_STRIDE + i) % KEY_MODULUS for i in range(rows)]
        self.keys = torch.tensor(keys, dtype=torch.int64, device=device)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.row_shape = (UNIFORMS + math.prod(self.image_shape),)  # one Philox row: u₁, u₂, then ε
        self.num_timesteps, self.grad_accum = num_timesteps, grad_accum
        self.step = torch.zeros(1, dtype=torch.int64, device=device)

    def start_at(self, step: int) -> None:
        """The next draws are those of optimizer step `step` (a new run: 0; a resumed one: its step)."""
        self.step.fill_(step)

    def advance(self) -> None:
        self.step += 1

    def draw(self, micro: int, y: torch.Tensor | None, null_class: int | None, p_uncond: float):
        """(y with dropped labels or None, t [N] int64, ε [N x C x H x W] fp32) for micro-batch `micro`
        of the current step. y: [N] labels (None for an unconditional model), each replaced by
        null_class with probability p_uncond."""
        stream = self.step * self.grad_accum + micro
        z = per_sample_noise(self.keys, self.row_shape, self.keys.device, torch.float32, stream)
        u = normal_cdf(z[:, :UNIFORMS])
        t = (u[:, 0] * self.num_timesteps).long().clamp_(max=self.num_timesteps - 1)
        if y is not None and null_class is not None:
            y = y.masked_fill(u[:, 1] < p_uncond, null_class)
        return y, t, z[:, UNIFORMS:].reshape(z.shape[0], *self.image_shape)


class GraphedStep:
    """A loop.GradientStep whose steady-state iterations replay one CUDA graph (module docstring).

    The first WARMUP_STEPS calls run eagerly on a side stream (they are real steps: they build the
    optimizer's state, Triton's compiled kernels and the allocator's pools); the next call captures the
    step and replays it, and every later call only copies its batch in and replays. Same call as
    GradientStep: micro_batches [(x0 [N x C x H x W], y [N]), …] → (loss, gradient norm, skipped), device
    tensors that the next call overwrites (read them, or add them up, before calling again).

    step: a GradientStep with `draws` set, whose optimizer is fused AdamW with capturable=True; its
    groups' lr become device tensors here (the one the graph reads). capture=False: the same work
    uncaptured, every call.
    """

    WARMUP_STEPS = 3

    def __init__(self, step, capture: bool = True):
        if step.draws is None:
            raise ValueError("a graphed step draws t, ε and the label dropout from CounterDraws; "
                             "build its GradientStep with draws=CounterDraws(...)")
        self.step, self.capture = step, capture
        groups = step.state.optimizer.param_groups
        device = step.draws.keys.device
        self.lr = [g["lr"] if torch.is_tensor(g["lr"]) else torch.tensor(float(g["lr"]), device=device)
                   for g in groups]
        for group, lr in zip(groups, self.lr):
            group["lr"] = lr
        # the warm-up steps are meant to run uncaptured: no warning that a capturable optimizer does so
        step.state.optimizer._warned_capturable_if_run_uncaptured = True
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.outputs: tuple | None = None
        self.graph, self.side, self.calls = None, None, 0

    def sync_lr(self) -> None:
        """Puts the LR schedule's value into the tensor the graph reads (a scheduler, or a checkpoint's
        load, that writes a float into the group replaces the tensor; one that fills it leaves it in
        place). Every call runs it first."""
        for group, lr in zip(self.step.state.optimizer.param_groups, self.lr):
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
        self.sync_lr()
        if self.inputs is None:
            self.inputs = [(x0.clone(), y.clone()) for x0, y in micro_batches]
        else:
            for (x0_in, y_in), (x0, y) in zip(self.inputs, micro_batches):
                x0_in.copy_(x0)
                y_in.copy_(y)
        self.calls += 1
        if not self.capture:
            return self.step(self.inputs)
        # on the data's GPU: capture and replay use the current device's streams (--device cuda:N)
        with torch.cuda.device(self.inputs[0][0].device):
            if self.calls <= self.WARMUP_STEPS:
                return self._on_side_stream()
            if self.graph is None:
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA calls (a DataLoader's pin-memory thread) stay legal
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.outputs = self.step(self.inputs)
                self.graph = graph
            self.graph.replay()
        return self.outputs

    def _on_side_stream(self) -> tuple:
        """One eager step on a side stream (the same one each time), as CUDA graph capture wants its warm-up."""
        device = self.inputs[0][0].device
        if self.side is None:
            self.side = torch.cuda.Stream(device)
        self.side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.side):
            out = self.step(self.inputs)
        torch.cuda.current_stream(device).wait_stream(self.side)
        return out
