"""Euler and Heun on the Karras sigmas (Karras et al. 2022): the noise levels against EDM Eq. 5 and
diffusers, each network call against diffusers' EulerDiscreteScheduler / HeunDiscreteScheduler
(use_karras_sigmas=True; ε-, v- and x0-prediction), the whole chain against diffusers' loop, convergence
to the probability-flow solution of Gaussian data (Heun second order), the NFE, and the fused step."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.diffusion.prediction import set_prediction
from shared.diffusion.samplers import SamplerOptions, count_nfe, make_sampler
from shared.diffusion.schedule import NoiseSchedule, alpha_bar_at, karras_sigmas, timestep_from_sigma
from shared.diffusion.noise import per_sample_noise
from shared.errors import UserError
from tests.scheduler_parity import AsPrediction, diffusers_scheduler, lockstep
from tests.tiny_trained import draw, one_thread, random_conditional_unet, trained_tiny_model  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")

PARITY = 1e-5  # per network call, in the samplers' coordinates (the issue's bar)


def edm_eq5(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5, in numpy float64: t_i for i < N."""
    i = np.arange(n)
    return (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@pytest.mark.parametrize("kind, steps", [("linear", 1), ("linear", 2), ("linear", 10), ("cosine", 37)])
def test_karras_sigmas_are_edm_eq5_between_the_schedules_ends(kind, steps):
    schedule = NoiseSchedule(kind, 1000)
    abar = np.cumprod(1 - schedule.betas.numpy())
    sigma = np.sqrt((1 - abar) / abar)
    got = np.array(karras_sigmas(schedule, steps))
    np.testing.assert_allclose(got, edm_eq5(sigma[0], sigma[-1], steps), rtol=1e-12)
    assert got[0] == pytest.approx(sigma[-1], rel=1e-12)
    if steps > 1:
        assert got[-1] == pytest.approx(sigma[0], rel=1e-12) and np.all(np.diff(got) < 0)


def test_timestep_from_sigma_interpolates_log_sigma():
    schedule = NoiseSchedule("linear", 100)
    for t in (0, 1, 37, 99):  # exact at the schedule's own levels, and alpha_bar_at inverts it
        assert timestep_from_sigma(schedule, float(schedule.sigmas[t])) == pytest.approx(t, abs=1e-9)
        assert alpha_bar_at(schedule, float(t)) == pytest.approx(float(schedule.alphas_cumprod[t]), rel=1e-12)
    lo, hi = float(schedule.sigmas[40]), float(schedule.sigmas[41])
    mid = math.exp(0.25 * math.log(lo) + 0.75 * math.log(hi))  # a quarter of the way in log σ from 41
    assert timestep_from_sigma(schedule, mid) == pytest.approx(40.75, abs=1e-9)
    assert 1 / alpha_bar_at(schedule, 40.75) - 1 == pytest.approx(mid ** 2, rel=1e-9)
    assert timestep_from_sigma(schedule, 1e-6) == 0.0 and timestep_from_sigma(schedule, 1e6) == 99.0


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_sigmas_and_timesteps_are_diffusers(name, steps):
    """Given our float64 ᾱ, diffusers' levels and (fractional) timesteps are ours to float32 rounding; from
    its own float32 ᾱ its σ differ by at most 1e-4 relatively (σ_0 = √(β_0/ᾱ_0) loses digits in float32)."""
    schedule = NoiseSchedule("linear", 1000)
    ours = make_sampler(schedule, SamplerOptions(sampler=name, num_steps=steps))
    levels = torch.tensor(ours.call_sigmas() + [0.0], dtype=torch.float64)
    for float64_alphas, rtol in ((True, 2e-7), (False, 1e-4)):
        ref = diffusers_scheduler(diffusers, name, schedule, "eps", steps, float64_alphas)
        torch.testing.assert_close(ref.sigmas.double(), levels, rtol=rtol, atol=0)
        times = torch.tensor(ours.timesteps, dtype=torch.float64)
        torch.testing.assert_close(ref.timesteps.double(), times, rtol=0, atol=1e-4 if float64_alphas else 2e-2)
    assert ours.nfe == len(ref.timesteps) == (2 * steps - 1 if name == "heun" else steps)


def as_network(prediction: str):
    """The trained tiny denoiser (T = 100) as an ε-, v- or x0-network of the same function, and its schedule:
    a real denoiser keeps x in the data's range, where 1e-5 is a fair bar for float32 steps."""
    model, schedule = trained_tiny_model()
    return (model if prediction == "eps" else set_prediction(AsPrediction(model, schedule, prediction), prediction),
            schedule)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_every_call_matches_diffusers(name, prediction):
    """The issue's bar: each call within 1e-5 of diffusers' step (fed the same state and network output)."""
    model, schedule = as_network(prediction)
    labels = torch.tensor([0, 4, 7])
    for steps in (6, 12):
        errors = lockstep(diffusers, model, schedule, name, steps, labels=labels)
        assert max(errors) <= PARITY, errors
        # with diffusers' own float32 ᾱ its σ move slightly; the steps still agree to 5e-5
        stock = lockstep(diffusers, model, schedule, name, steps, labels=labels, float64_alphas=False)
        assert max(stock) <= 5e-5, stock


def test_heun_clipping_is_diffusers_clip_sample():
    """clip_x0 clips each stage's x̂0 and recomputes its ε from it, as HeunDiscreteScheduler(clip_sample=True)
    (the tiny model's early x̂0 leave [−1, 1], so the clip acts)."""
    model, schedule = as_network("v")
    errors = lockstep(diffusers, model, schedule, "heun", 8, labels=torch.tensor([1, 5, 9]), clip=True)
    assert max(errors) <= PARITY, errors


def test_whole_chain_matches_diffusers_loop():
    """Our `sample` against diffusers' loop (scale_model_input, the network at its float timesteps, step)."""
    model, schedule = random_conditional_unet(), NoiseSchedule("linear", 1000)
    labels, seeds = torch.tensor([2, 0]), [5, 6]
    for name in ("euler", "heun"):
        ours = draw(model, schedule, seeds, labels=labels, sampler=name, num_steps=8)
        ref = diffusers_scheduler(diffusers, name, schedule, "eps", 8)
        x = per_sample_noise(seeds, (1, 8, 8), "cpu", torch.float32, 0) * math.sqrt(float(ref.sigmas[0]) ** 2 + 1)
        with torch.no_grad():
            for t in ref.timesteps:
                out = model(ref.scale_model_input(x, t), t.expand(2), labels)
                x = ref.step(out, t, x).prev_sample
        torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)  # (an untrained net: |x| grows to ~300)


class GaussianData(torch.nn.Module):
    """The exact ε (or v) for data x0 ~ N(0, s² I) [1 x 4 x 4], at fractional timesteps too: ᾱ(t) from log σ
    interpolated linearly between integer timesteps (numpy, independent of the code under test)."""

    in_channels, image_size, num_classes = 1, 4, 0

    def __init__(self, schedule: NoiseSchedule, std: float, prediction: str = "eps"):
        super().__init__()
        self.log_sigmas, self.std, self.prediction = np.log(schedule.sigmas.numpy()), std, prediction
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        log_sigma = np.interp(t.double().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas)
        abar = torch.from_numpy(1 / (1 + np.exp(2 * log_sigma))).view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * x.double() / (abar * self.std ** 2 + 1 - abar)
        if self.prediction == "v":
            x0 = (x.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
            return (abar.sqrt() * eps - (1 - abar).sqrt() * x0).float()
        return eps.float()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_heun_is_second_order_on_the_probability_flow(prediction):
    """Gaussian data: the ODE maps x_σ to x_σ·√(s² + σ'²)/√(s² + σ²), so x0 = x_T·√(σ_0² + 1)·s/√(s² + σ_0²)."""
    schedule, std, seeds = NoiseSchedule("linear", 1000), 0.5, list(range(6))
    oracle = GaussianData(schedule, std, prediction)
    sigma_max = float(schedule.sigmas[-1])
    exact = per_sample_noise(seeds, (1, 4, 4), "cpu", torch.float32, 0).double() * math.sqrt(sigma_max ** 2 + 1) \
        * std / math.sqrt(std ** 2 + sigma_max ** 2)
    err = {(name, steps): float((draw(oracle, schedule, seeds, sampler=name, num_steps=steps) - exact).abs().max())
           for name in ("euler", "heun") for steps in (10, 20, 40)}
    for name in ("euler", "heun"):
        assert err[name, 40] < err[name, 20] < err[name, 10]
    # twice the levels: first order about halves the error (1.9× measured), second order quarters it (4.5×)
    assert err["euler", 20] / err["euler", 40] < 2.5 and err["heun", 20] / err["heun", 40] > 3.5
    assert err["heun", 20] < 0.8 * err["euler", 40]  # 39 NFE of Heun beat 40 NFE of Euler


def test_nfe_and_the_callback():
    schedule, model, seen = NoiseSchedule("linear", 100), random_conditional_unet(), []
    draw(model, schedule, [1], labels=[0], sampler="heun", num_steps=5, callback=lambda i, t, x, x0: seen.append(t))
    assert len(seen) == 9 == count_nfe(SamplerOptions(sampler="heun", num_steps=5), 100)
    assert seen[1] == seen[2] and seen[0] == pytest.approx(99.0) and all(isinstance(t, float) for t in seen)
    assert count_nfe(SamplerOptions(sampler="euler", num_steps=5), 100) == 5
    with pytest.raises(UserError, match="Karras sigmas"):
        make_sampler(schedule, SamplerOptions(sampler="euler"), timesteps=[9, 5, 1])
    with pytest.raises(UserError, match="steps must lie"):
        make_sampler(schedule, SamplerOptions(sampler="heun", num_steps=101))


def _fused_available() -> bool:
    import kernels

    try:
        kernels.load("ddim_step")
    except kernels.FusedKernelsUnavailable:
        return False
    return True


@pytest.mark.skipif(not _fused_available(), reason="the fused sampling step cannot be built here")
@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_fused_step_matches_the_eager_step(name, prediction):
    model = set_prediction(random_conditional_unet(), prediction)
    kw = dict(labels=[0, 1, 2], sampler=name, num_steps=6, guidance_scale=2.5, clip_x0=True)
    eager = draw(model, NoiseSchedule("linear", 50), [5, 6, 7], **kw)
    fused = draw(model, NoiseSchedule("linear", 50), [5, 6, 7], fused_step=True, **kw)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
