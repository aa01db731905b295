"""Samplers behind one interface, and the loop that runs them: DDPM, DDIM, DPM-Solver++(2M), with CFG.

A sampler is what diffusers calls a scheduler: the timesteps it visits and one update,

    sampler.timesteps                       descending ints in [0, T)
    sampler.step(i, x_t, ε, z, ε_u)         → (x_prev, x̂0), the update of the i-th visited timestep
    sampler.stochastic                      whether step i consumes fresh noise z
    sampler.noise_in_kernel                 whether z goes in as InKernelNoise (the fused step draws it)

and the loop (`sample_batch`) owns the model calls and the random numbers: sample i with seed s draws
x_T from stream 0 of its seed and step k's noise from stream k + 1 (`shared.diffusion.noise`), so
image i is the same at any batch size. The loop never looks at a sampler's name.

    sampler  class               timesteps visited                      update
    ddpm     DDPMSampler         all T (t = T−1 … 0)                    DDPM Alg. 2
             DDIMSampler(η = 1)  respaced S < T                         DDIM Eq. 12 with η = 1
    ddim     DDIMSampler(η)      ddim_timesteps(T, S, spacing)          DDIM Eq. 12
    dpmpp    DPMSolverPP2M       ddim_timesteps(T, S, spacing)          DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)

Every update goes through `shared.diffusion.steps.ddpm_update` / `ddim_update` on the scalars of
`shared.diffusion.coefficients` (or, with fused_step, the fused `kernels.ddpm_step` / `kernels.ddim_step`
of the same signature, guidance folded in).

DPM-Solver++(2M) as a DDIM step. With λ = log(α/σ), α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), h = λ_prev − λ_t,
the 2M update x_prev = (σ_prev/σ_t)·x_t − α_prev·(e^{−h} − 1)·D equals DDIM (η = 0) applied to the
corrected data estimate D = (1 + 1/(2r))·x̂0_i − 1/(2r)·x̂0_{i−1}, r = h_{i−1}/h_i (Lu et al. 2022,
Eq. 9 and Alg. 2): both are α_prev·D + σ_prev·(x_t − α_t·D)/σ_t. So we hand ddim_step the ε that
corresponds to D, ε_D = (x_t − α_t·D)/σ_t. The first step and the final step onto t_prev = −1
(σ_prev = 0, h = ∞) are first order, i.e. plain DDIM.

The same three updates in one affine form (`shared.diffusion.steps.affine_step`), with per-step
float64 coefficients (`Sampler.coefficients`, one row per visited timestep) that a captured CUDA graph
reads from a device tensor (`GraphedSampling`).

What a run is asked to do travels as one `SamplerOptions`, from the command line
(shared.interface.sampling_args) and the HTTP API (shared.interface.server) to `sample`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

import kernels
from kernels.sampling_step.op import InKernelNoise
from shared.diffusion.coefficients import ddim_coefficients, ddpm_coefficients
from shared.diffusion.guidance import MAX_GUIDANCE, cfg_combine, check_labels, model_eps
from shared.diffusion.noise import per_sample_noise, seeds_tensor
from shared.diffusion.schedule import NoiseSchedule
from shared.diffusion.steps import (SPACINGS, VARIANCES, affine_step, ddim_timesteps, ddim_update, ddpm_update,
                                    eps_from_x0, predict_x0_from_eps)
from shared.errors import UserError
from shared.model.precision import check_precision

SAMPLERS = ("ddpm", "ddim", "dpmpp")
# Stream 0 of a sample's seed draws x_T; step k draws its fresh noise from stream k + 1.
X_T_STREAM = 0
DEFAULT_FAST_STEPS = 50  # ddim / dpmpp without a step count
# DDIM η: σ grows with η and past 1 the direction term is already clamped to 0, so a larger η only adds
# noise; the bound keeps σ (and the samples) finite.
MAX_ETA = 100.0
# Columns of Sampler.coefficients(): the affine form of the module docstring.
COEFFICIENTS = ("a", "b", "c", "d", "e", "sigma", "w")

# callback(step_index, t, x_t, x0_pred): x_t the sample entering the step at timestep t, x0_pred its x̂0.
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """What one sampling run is asked to do; `check()` refuses bad values with a UserError."""

    sampler: str = "ddim"
    num_steps: int | None = None      # S; None: T for ddpm, 50 (≤ T) for ddim / dpmpp
    eta: float = 0.0                  # DDIM η ≥ 0
    spacing: str = "trailing"         # how S of the T timesteps are picked (SPACINGS)
    clip_x0: bool = False             # clip x̂0 to [−1, 1] at every step
    guidance_scale: float = 1.0       # CFG w: 0 unconditional, 1 conditional, > 1 guided
    variance: str = "fixed_small"     # DDPM σ_t²: β̃_t or β_t (VARIANCES)
    precision: str = "fp32"           # autocast dtype of the U-Net
    fused_step: bool = False          # kernels.ddpm_step / ddim_step for the update
    cuda_graphs: bool = False         # U-Net + step captured once per batch shape and replayed
    batch_size: int = 64              # images per forward (image i is the same at any batch size)

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.variance not in VARIANCES:
            raise UserError(f"unknown variance {self.variance!r}; choose one of {', '.join(VARIANCES)}")
        if self.spacing not in SPACINGS:
            raise UserError(f"unknown spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        check_precision(self.precision)
        if not (math.isfinite(self.eta) and 0 <= self.eta <= MAX_ETA):
            raise UserError(f"eta must be a number in [0, {MAX_ETA}], got {self.eta}")
        if not (math.isfinite(self.guidance_scale) and 0 <= self.guidance_scale <= MAX_GUIDANCE):
            raise UserError(f"guidance_scale must be a number in [0, {MAX_GUIDANCE}], got {self.guidance_scale}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


def default_steps(sampler: str, num_steps: int | None, num_train_timesteps: int) -> int:
    """The step count a sampler runs: num_steps if given, else T for ddpm and 50 (≤ T) for the others."""
    if num_steps is not None:
        return num_steps
    return num_train_timesteps if sampler == "ddpm" else min(DEFAULT_FAST_STEPS, num_train_timesteps)


def sampler_timesteps(sampler: str, num_train_timesteps: int, num_steps: int | None,
                      spacing: str = "trailing") -> list[int]:
    """The timesteps a sampler visits, descending; num_steps None means default_steps."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = default_steps(sampler, num_steps, num_train_timesteps)
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"steps must lie in [1, {num_train_timesteps}] for this model, got {steps}")
    if spacing not in SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return ddim_timesteps(num_train_timesteps, steps, spacing)


# --------------------------------------------------------------------------------------------------
# The samplers


class Sampler:
    """The timesteps a solver visits and its update; subclasses implement `step` and `_row`."""

    stochastic = False

    def __init__(self, schedule: NoiseSchedule, timesteps: Sequence[int], opts: SamplerOptions):
        self.schedule, self.timesteps, self.opts = schedule, list(timesteps), opts
        # The eager update or its fused twin: the same signature (shared.diffusion.steps, kernels).
        self.ddpm_update = kernels.load("ddpm_step") if opts.fused_step else ddpm_update
        self.ddim_update = kernels.load("ddim_step") if opts.fused_step else ddim_update
        self.reset()

    def t_prev(self, i: int) -> int:
        """The timestep step i lands on: the next visited one, −1 (x0) after the last."""
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def reset(self) -> None:
        """Forgets what earlier steps left (called before each batch)."""

    @property
    def noise_in_kernel(self) -> bool:
        """Whether step() takes an `InKernelNoise` for z: the fused DDPM / DDIM step draws it itself."""
        return self.opts.fused_step and self.stochastic

    def step(self, i: int, x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | InKernelNoise | None = None,
             eps_uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t [N x C x H x W] at timesteps[i] → (x at t_prev(i), x̂0), both [N x C x H x W]. noise: z
        [N x C x H x W], or an InKernelNoise when `noise_in_kernel`. With eps_uncond, ε is ε_c and the
        update forms ε̃ = ε_u + w·(ε_c − ε_u) itself (fused: in-kernel)."""
        raise NotImplementedError

    def coefficients(self) -> torch.Tensor:
        """float64 [S x 7]: row i holds step i's (a, b, c, d, e, σ, w) of `affine_step`."""
        return torch.tensor([self._row(i) for i in range(len(self.timesteps))], dtype=torch.float64)

    def _row(self, i: int) -> list[float]:
        raise NotImplementedError


class DDPMSampler(Sampler):
    """Ancestral sampling over all T timesteps (Ho et al. 2020, Alg. 2)."""

    stochastic = True

    def step(self, i, x_t, eps, noise=None, eps_uncond=None):
        coefs = ddpm_coefficients(self.schedule, self.timesteps[i], self.opts.variance)
        return self.ddpm_update(x_t, eps, coefs, noise, self.opts.clip_x0, eps_uncond, self.opts.guidance_scale)

    def _row(self, i):
        c = ddpm_coefficients(self.schedule, self.timesteps[i], self.opts.variance)
        return [c.x0_coef_xt, c.x0_coef_eps, c.out_coef_x0, c.out_coef_rest, 0.0, c.sigma, 0.0]


class DDIMSampler(Sampler):
    """The generalised step of Song et al. 2021 (Eq. 12, σ from Eq. 16) at stochasticity η."""

    def __init__(self, schedule, timesteps, opts, eta: float):
        super().__init__(schedule, timesteps, opts)
        self.eta = eta
        self.stochastic = eta > 0

    def step(self, i, x_t, eps, noise=None, eps_uncond=None):
        coefs = ddim_coefficients(self.schedule, self.timesteps[i], self.t_prev(i), self.eta)
        return self.ddim_update(x_t, eps, coefs, noise, self.opts.clip_x0, eps_uncond, self.opts.guidance_scale)

    def _row(self, i):
        c = ddim_coefficients(self.schedule, self.timesteps[i], self.t_prev(i), self.eta)
        return [c.x0_coef_xt, c.x0_coef_eps, c.out_coef_x0, 0.0, c.out_coef_rest, c.sigma, 0.0]


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), each step a DDIM step on ε_D (module docstring)."""

    def reset(self):
        self.last_x0: torch.Tensor | None = None  # the previous step's x̂0

    def _log_snr_half(self, t: int) -> float:
        """λ_t = log(α_t / σ_t) = −log √(1/ᾱ_t − 1), half the log-SNR, in float64 (t ≥ 0)."""
        return -math.log(float(self.schedule.sqrt_recipm1_alphas_cumprod[t]))

    def _correction(self, i: int) -> float:
        """w = 1/(2r), r = h_{i−1}/h_i, of D = x̂0_i + w·(x̂0_i − x̂0_{i−1}); 0 on first-order steps
        (the first step, and the last one onto t = −1 where h = ∞)."""
        if i == 0 or self.t_prev(i) < 0:
            return 0.0
        lam_last, lam_t, lam_prev = (self._log_snr_half(s) for s in
                                     (self.timesteps[i - 1], self.timesteps[i], self.t_prev(i)))
        return (lam_prev - lam_t) / (2 * (lam_t - lam_last))

    def step(self, i, x_t, eps, noise=None, eps_uncond=None):
        if eps_uncond is not None:  # the 2M correction needs ε̃ itself
            eps = cfg_combine(eps, eps_uncond, self.opts.guidance_scale)
        t = self.timesteps[i]
        x0_pred = predict_x0_from_eps(self.schedule, x_t, eps, t)  # x̂0_i
        if self.opts.clip_x0:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
        w = self._correction(i) if self.last_x0 is not None else 0.0
        data_estimate = x0_pred + w * (x0_pred - self.last_x0) if w else x0_pred
        coefs = ddim_coefficients(self.schedule, t, self.t_prev(i), 0.0)
        eps_d = eps_from_x0(x_t, data_estimate, coefs.x0_coef_xt, coefs.x0_coef_eps)  # DDIM's x̂0 is then D
        self.last_x0 = x0_pred
        x_prev, _ = self.ddim_update(x_t, eps_d, coefs, return_x0=False)
        return x_prev, x0_pred

    def _row(self, i):
        c = ddim_coefficients(self.schedule, self.timesteps[i], self.t_prev(i), 0.0)
        return [c.x0_coef_xt, c.x0_coef_eps, c.out_coef_x0, 0.0, c.out_coef_rest, 0.0, self._correction(i)]


def make_sampler(schedule: NoiseSchedule, opts: SamplerOptions, timesteps: Sequence[int] | None = None) -> Sampler:
    """The sampler opts asks for, visiting `timesteps` (default: sampler_timesteps of opts)."""
    opts.check()
    if timesteps is None:
        timesteps = sampler_timesteps(opts.sampler, schedule.num_timesteps, opts.num_steps, opts.spacing)
    full_chain = list(timesteps) == list(range(schedule.num_timesteps - 1, -1, -1))
    if opts.sampler == "ddpm":  # respaced DDPM is DDIM with η = 1 (Song et al. 2021, Sec. 4.3)
        return DDPMSampler(schedule, timesteps, opts) if full_chain else DDIMSampler(schedule, timesteps, opts, 1.0)
    if opts.sampler == "ddim":
        return DDIMSampler(schedule, timesteps, opts, opts.eta)
    return DPMSolverPP2M(schedule, timesteps, opts)


# --------------------------------------------------------------------------------------------------
# The loop


def sample_batch(model: torch.nn.Module, sampler: Sampler, seeds: torch.Tensor, labels: torch.Tensor | None,
                 callback: Callback | None = None, bar=None, max_steps: int | None = None) -> torch.Tensor:
    """One batch through the whole chain: x_T from each seed, then every step of `sampler`.

    seeds: int64 [N] on the sampling device; labels: int64 [N] there, or None. max_steps stops after
    that many steps (benchmarks time a prefix of a long chain). Returns x at the last step, float32.
    """
    opts = sampler.opts
    shape_chw = (model.in_channels, model.image_size, model.image_size)
    x = per_sample_noise(seeds, shape_chw, seeds.device, torch.float32, X_T_STREAM)
    sampler.reset()
    for i, t in enumerate(sampler.timesteps[:max_steps]):
        eps, eps_uncond = model_eps(model, x, t, labels, opts.guidance_scale, opts.precision)
        noise = None
        if sampler.noise_in_kernel:  # the fused step draws the same values itself: one pass fewer
            noise = InKernelNoise(seeds, i + 1)
        elif sampler.stochastic:
            noise = per_sample_noise(seeds, shape_chw, seeds.device, torch.float32, i + 1)
        x_next, x0_pred = sampler.step(i, x, eps, noise, eps_uncond)
        if callback is not None:
            callback(i, t, x, x0_pred)
        x = x_next
        if bar is not None:
            bar.update(1)
    return x


def sample_batches(model: torch.nn.Module, schedule: NoiseSchedule, seeds: Sequence[int],
                   opts: SamplerOptions = SamplerOptions(), labels: torch.Tensor | Sequence[int] | None = None,
                   device: torch.device | str | None = None, callback: Callback | None = None,
                   progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """`sample`, one batch of opts.batch_size at a time: checks everything now, then yields (index of
    the batch's first sample, its float32 [B x C x H x W] samples), so a caller can write each batch
    and drop it."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("no seeds given: nothing to sample")
    solver = make_sampler(schedule, opts)  # checks opts
    labels = check_labels(labels, len(seeds), getattr(model, "num_classes", 0))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if opts.cuda_graphs and device.type != "cuda":
        raise UserError(f"CUDA graphs need a CUDA device, but sampling runs on {device}; drop --cuda-graphs")
    all_seeds = seeds_tensor(seeds, device)
    # One GraphedSampling for the whole call: each batch shape is captured once and replayed after.
    run_batch = (GraphedSampling(model, solver, callback).run if opts.cuda_graphs
                 else functools.partial(sample_batch, model, solver, callback=callback))

    @torch.no_grad()
    def batches():
        steps, size = len(solver.timesteps), opts.batch_size
        with tqdm(total=math.ceil(len(seeds) / size) * steps, desc=f"{opts.sampler} {steps} steps",
                  disable=not progress, leave=False) as bar:
            for start in range(0, len(seeds), size):
                chunk = slice(start, start + size)
                batch_labels = labels[chunk].to(device) if labels is not None else None
                yield start, run_batch(all_seeds[chunk], batch_labels, bar=bar)

    return batches()


def sample(model: torch.nn.Module, schedule: NoiseSchedule, seeds: Sequence[int],
           opts: SamplerOptions = SamplerOptions(), labels: torch.Tensor | Sequence[int] | None = None,
           device: torch.device | str | None = None, callback: Callback | None = None,
           progress: bool = True) -> torch.Tensor:
    """Draws len(seeds) samples as `opts` asks; returns float32 [N x C x H x W] on `device` (not clipped).

    seeds: one int per sample (image i depends on seeds[i] only, not on opts.batch_size).
    labels: [N] class indices for a class-conditional model (None: unconditional, ε_θ(x, ∅)); with
    opts.guidance_scale w, ε̃ = ε_u + w(ε_c − ε_u).  device: default the model's.
    callback(step_index, t, x_t, x̂0) sees every step of every batch.  progress: a tqdm bar.
    """
    batches = sample_batches(model, schedule, seeds, opts, labels, device, callback, progress)
    return torch.cat([images for _, images in batches])


# --------------------------------------------------------------------------------------------------
# CUDA graphs


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

    def __init__(self, model: torch.nn.Module, sampler: Sampler, callback: Callback | None = None,
                 capture: bool = True):
        """capture=False runs the same iteration uncaptured, every step (on any device: how the CPU
        tests check the graph's math)."""
        if sampler.opts.fused_step:
            raise UserError("CUDA graphs replay their own on-device step; use them without the fused sampling step")
        self.model, self.sampler, self.callback, self.capture = model, sampler, callback, capture
        self.graphs: dict[tuple, tuple] = {}

    def _iteration(self, io: dict) -> None:
        """The captured work: reads io's input tensors, writes io["x_next"] and io["x0"]."""
        opts, x = self.sampler.opts, io["x"]
        # index_select with a [1] tensor: indexing with a 0-d tensor would read it back to the host.
        row = io["coefs"].index_select(0, io["index"]).squeeze(0)             # [7]
        t = io["timesteps"].index_select(0, io["index"]).expand(x.shape[0])   # [N]
        eps, eps_uncond = model_eps(self.model, x, t, io["labels"], opts.guidance_scale, opts.precision)
        if eps_uncond is not None:
            eps = cfg_combine(eps, eps_uncond, opts.guidance_scale)
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
                  timesteps=torch.tensor(self.sampler.timesteps, dtype=torch.int64, device=device))
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
