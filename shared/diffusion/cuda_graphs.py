"""One sampler iteration (U-Net, guidance, ε conversion, noise and the update) as a CUDA graph.

`GraphedSampling` captures the iteration once per batch shape and replays it for every network call;
everything that changes between calls is read from device tensors: the call index, and indexed by it the
timestep, the noise stream, the row of `affine_step` coefficients (`Sampler.coefficients`) and the
call's guidance w and ε conversion (p, q) (`GraphedSampling.call_table`). The update is `affine_step`,
the eager samplers' math in one form (tests/test_sampler_interface.py checks them equal, uncaptured on
a CPU). `shared.diffusion.samplers.sample_batches` runs it for `SamplerOptions(cuda_graphs=True)`.
"""
from __future__ import annotations

from typing import Callable

import torch

from shared.diffusion.guidance import cfg_combine, model_eps, rescale_cfg
from shared.diffusion.noise import X_T_STREAM, per_sample_noise
from shared.diffusion.prediction import eps_coefficients, eps_from_output, prediction_of
from shared.diffusion.steps import affine_step
from shared.errors import UserError

# Columns of GraphedSampling's per-call table: guidance w, and (p, q) of ε = p·output + q·x_t.
CALL_COLUMNS = ("guidance", "p", "q")
# Any w other than 0 and 1 makes model_eps run both passes (a graph with per-call w combines them itself).
BOTH_PASSES = 2.0

# callback(step_index, t, x_t, x0_pred), as shared.diffusion.samplers.Callback.
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class GraphedSampling:
    """One sampler iteration (U-Net + step + noise) captured as a CUDA graph per batch shape, replayed.

    The graph reads everything that changes between steps from device tensors it owns: the step
    index (filled from a Python int before each replay), the timestep and coefficient tables indexed
    by it, the noise stream (index + 1), and x_t / x̂0 of the previous step. Guidance w, clip_x0 and
    the labels are fixed for one `sample` call, as is the sampler. Captured on first use of a shape,
    after two warm-up iterations on a side stream (Triton autotuning and allocator growth must happen
    before capture). The update is `affine_step`, the eager steps' math in one form (tested equal).
    """

    WARMUP_ITERATIONS = 2

    def __init__(self, model: torch.nn.Module, sampler, callback: Callback | None = None,
                 capture: bool = True):
        """sampler: a shared.diffusion.samplers.Sampler. capture=False runs the same iteration uncaptured,
        every step (on any device: how the CPU tests check the graph's math)."""
        if sampler.opts.fused_step:
            raise UserError("CUDA graphs replay their own on-device step; use them without the fused sampling step")
        self.model, self.sampler, self.callback, self.capture = model, sampler, callback, capture
        self.graphs: dict[tuple, tuple] = {}
        # One w for every call: model_eps decides the passes from it; several (a guidance interval): both
        # passes every call, combined with the call's w from the table.
        scales = set(sampler.guidance_scales)
        self.pass_scale = scales.pop() if len(scales) == 1 else BOTH_PASSES
        self.converts = prediction_of(model) != "eps"

    def call_table(self) -> torch.Tensor:
        """float64 [S x 3]: call i's guidance w and (p, q) of ε = p·output + q·x_t (CALL_COLUMNS)."""
        prediction, rows = prediction_of(self.model), []
        for w, alpha_bar in zip(self.sampler.guidance_scales, self.sampler.alpha_bars):
            rows.append([w, *(eps_coefficients(prediction, alpha_bar) or (1.0, 0.0))])
        return torch.tensor(rows, dtype=torch.float64)

    def _iteration(self, io: dict) -> None:
        """The captured work: reads io's input tensors, writes io["x_next"] and io["x0"]."""
        opts, x = self.sampler.opts, io["x"]
        # index_select with a [1] tensor: indexing with a 0-d tensor would read it back to the host.
        row = io["coefs"].index_select(0, io["index"]).squeeze(0)             # [8]
        call = io["calls"].index_select(0, io["index"]).squeeze(0)            # [3]: w, p, q
        t = io["timesteps"].index_select(0, io["index"]).expand(x.shape[0])   # [N]
        out, out_uncond = model_eps(self.model, x, t, io["labels"], self.pass_scale, opts.precision)
        if out_uncond is not None:
            guided = cfg_combine(out, out_uncond, call[0])
            out = rescale_cfg(guided, out, opts.guidance_rescale) if opts.guidance_rescale > 0 else guided
        eps = eps_from_output(out, x, (call[1], call[2]) if self.converts else None)
        noise = (per_sample_noise(io["seeds"], x.shape[1:], x.device, x.dtype, io["index"] + 1)
                 if self.sampler.stochastic else None)
        x_next, x0 = affine_step(row, x, eps, noise, io["x0_last"], opts.clip_x0)
        io["x_next"], io["x0"] = x_next, x0

    def _capture(self, seeds: torch.Tensor, labels: torch.Tensor | None, shape: tuple) -> tuple:
        device = seeds.device
        io = dict(x=torch.zeros(shape, device=device), x0_last=torch.zeros(shape, device=device),
                  seeds=seeds.clone(), labels=None if labels is None else labels.clone(),
                  index=torch.zeros(1, dtype=torch.int64, device=device),
                  coefs=self.sampler.coefficients().to(device=device, dtype=torch.float32),
                  calls=self.call_table().to(device=device, dtype=torch.float32),
                  timesteps=torch.tensor(self.sampler.timesteps, device=device,
                                         dtype=torch.int64 if all(isinstance(t, int) for t in self.sampler.timesteps)
                                         else torch.float32))
        if not self.capture:
            return None, io
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_ITERATIONS):
                self._iteration(io)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._iteration(io)
        return graph, io

    def run(self, seeds: torch.Tensor, labels: torch.Tensor | None, bar=None,
            max_steps: int | None = None) -> torch.Tensor:
        """The whole chain for one batch (or its first max_steps steps), as `sample_batch` returns it."""
        model = self.model
        shape = (seeds.shape[0], model.in_channels, model.image_size, model.image_size)
        key = (shape, labels is None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(seeds, labels, shape)
        graph, io = self.graphs[key]
        io["seeds"].copy_(seeds)
        if labels is not None:
            io["labels"].copy_(labels)
        io["x"].copy_(per_sample_noise(seeds, shape[1:], seeds.device, torch.float32, X_T_STREAM))
        io["x0_last"].zero_()
        for i, t in enumerate(self.sampler.timesteps[:max_steps]):
            io["index"].fill_(i)
            if graph is not None:
                graph.replay()
            else:
                self._iteration(io)
            if self.callback is not None:
                self.callback(i, t, io["x"], io["x0"])
            io["x"].copy_(io["x_next"])
            io["x0_last"].copy_(io["x0"])
            if bar is not None:
                bar.update(1)
        return io["x"].clone()
