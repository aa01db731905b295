"""Our samplers against diffusers' schedulers, call by call: the same state and the same network output
go into our `Sampler.step` and into the diffusers scheduler's `step`, and the two results are compared in
our (variance-preserving) coordinates. diffusers is an optional test dependency (tests skip without it).

diffusers' Euler and Heun schedulers keep x in EDM's variance-exploding form x_σ = x_t·√(σ² + 1) and run
the network on scale_model_input(x_σ) = x_t; their results are divided by √(σ'² + 1) before comparing.
They derive σ from their float32 ᾱ (σ_0 moves by 8e-5 relatively); `float64_alphas` hands them our
float64 ᾱ instead, so that the comparison measures the algorithm, not that rounding.
"""
from __future__ import annotations

import math

import numpy as np

import torch

from shared.diffusion.guidance import guided_eps
from shared.diffusion.noise import per_sample_noise, seeds_tensor
from shared.diffusion.prediction import prediction_of
from shared.diffusion.samplers import SamplerOptions, make_sampler

DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def diffusers_scheduler(diffusers, name: str, schedule, prediction: str, num_steps: int, float64_alphas: bool = True,
                        clip: bool = False):
    """The diffusers scheduler that does what our sampler `name` does, with its timesteps set."""
    common = dict(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.tolist(),
                  prediction_type=DIFFUSERS_PREDICTION[prediction])
    if name in ("euler", "heun"):
        cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.HeunDiscreteScheduler
        extra = dict(clip_sample=clip) if name == "heun" else {}
        ref = cls(use_karras_sigmas=True, **common, **extra)
    elif name == "dpmpp":
        ref = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                                    timestep_spacing="trailing", thresholding=False, **common)
    elif name == "ddpm":  # the full chain, Algorithm 2 with β̃_t
        ref = diffusers.DDPMScheduler(clip_sample=clip, variance_type="fixed_small", timestep_spacing="leading",
                                      **common)
    else:  # ddim
        ref = diffusers.DDIMScheduler(clip_sample=clip, set_alpha_to_one=True, steps_offset=0,
                                      timestep_spacing="trailing", **common)
    if float64_alphas:
        ref.alphas_cumprod = schedule.alphas_cumprod.clone()
    ref.set_timesteps(num_steps)
    return ref


def _vp_scale(ref, name: str, index: int) -> tuple[float, float]:
    """(√(σ² + 1) of the state entering diffusers' call `index`, √(σ'² + 1) of the one it returns) for
    the Karras schedulers (diffusers' Heun list [σ_0, σ_1, σ_1, …] makes both index and index + 1 right
    for either stage); (1, 1) for the variance-preserving ones."""
    if name not in ("euler", "heun"):
        return 1.0, 1.0
    sigmas = ref.sigmas.double()
    return math.sqrt(float(sigmas[index]) ** 2 + 1.0), math.sqrt(float(sigmas[index + 1]) ** 2 + 1.0)


def lockstep(diffusers, model, schedule, name: str, num_steps: int, labels=None, eta: float = 0.0,
             clip: bool = False, float64_alphas: bool = True) -> list[float]:
    """Runs our sampler and diffusers' scheduler side by side from the same x_T and the same network
    outputs; returns, per network call, max |ours − theirs| / max(1, max |theirs|) of the state it lands
    on (our coordinates): the absolute difference while |x| ≤ 1, relative beyond, since a float32 step
    rounds at about 6e-8·|x| on both sides (diffusers' own float32 Heun step is 1.2e-5 from its float64
    value at |x| = 21). After each call both continue from our state, so a difference never feeds the
    next call."""
    prediction = prediction_of(model)
    opts = SamplerOptions(sampler=name, num_steps=num_steps, eta=eta, clip_x0=clip)
    ours = make_sampler(schedule, opts)
    ref = diffusers_scheduler(diffusers, name, schedule, prediction, num_steps, float64_alphas, clip)
    seeds = seeds_tensor([1, 2, 3], "cpu")
    shape = (model.in_channels, model.image_size, model.image_size)
    x = per_sample_noise(seeds, shape, "cpu", torch.float32, 0)
    assert len(ref.timesteps) == ours.nfe, (len(ref.timesteps), ours.nfe)
    errors: list[float] = []
    with torch.no_grad():
        for i, t_ref in enumerate(ref.timesteps):
            output = model(x, torch.full((x.shape[0],), ours.timesteps[i], dtype=torch.float32
                                         if isinstance(ours.timesteps[i], float) else torch.long), labels)
            eps, _ = guided_eps(_Fixed(output, prediction), ours, i, x, None)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) if ours.stochastic else None
            x_ours, _ = ours.step(i, x, eps, noise)
            into, out = _vp_scale(ref, name, i)
            state = x * into
            if name in ("euler", "heun"):  # what diffusers feeds the network is our state itself
                torch.testing.assert_close(ref.scale_model_input(state, t_ref), x, rtol=1e-5, atol=1e-6)
            kw = {"ddim": {"eta": eta, "variance_noise": noise},
                  "ddpm": {"generator": torch.Generator().manual_seed(i)}}.get(name, {})
            x_ref = ref.step(output, t_ref, state, **kw).prev_sample.double() / out
            errors.append(float((x_ours.double() - x_ref).abs().max()) / max(1.0, float(x_ref.abs().max())))
            x = x_ours
    return errors


class _Fixed(torch.nn.Module):
    """A 'network' that returns one precomputed output (so both sides see exactly the same values)."""

    num_classes = 0

    def __init__(self, output: torch.Tensor, prediction: str):
        super().__init__()
        self.output, self.prediction = output, prediction

    def forward(self, x, t, y=None):
        return self.output


class AsPrediction(torch.nn.Module):
    """An ε-network re-expressed as a v- or x0-network of the same denoiser: v = √ᾱ·ε − √(1−ᾱ)·x̂0 and
    x̂0 = (x_t − √(1−ᾱ)·ε)/√ᾱ, ᾱ at (fractional) t from log σ interpolated between timesteps (numpy
    float64, independent of the code under test). Sampling it as `prediction` must give what sampling the
    ε-network gives."""

    def __init__(self, eps_model: torch.nn.Module, schedule, prediction: str):
        super().__init__()
        self.eps_model, self.prediction = eps_model, prediction
        self.log_sigmas = np.log(schedule.sigmas.numpy())
        for name in ("in_channels", "image_size", "num_classes", "null_class"):
            if hasattr(eps_model, name):
                setattr(self, name, getattr(eps_model, name))

    def forward(self, x, t, y=None):
        t = torch.as_tensor(t).expand(x.shape[0]) if not torch.is_tensor(t) or t.ndim == 0 else t
        eps = self.eps_model(x, t, y).double()
        log_sigma = np.interp(t.double().cpu().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas)
        abar = torch.from_numpy(1 / (1 + np.exp(2 * log_sigma))).view(-1, *[1] * (x.ndim - 1))
        x0 = (x.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
        out = x0 if self.prediction == "x0" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
        return out.to(x.dtype)
