"""Sampler loops: exact-denoiser oracles, per-sample seeds, guidance batching, callbacks, fused path.

Two oracles give known answers without training:
  * Gaussian data N(0, s²I): the exact ε is linear, ε*(x_t) = √(1−ᾱ)·x_t / (ᾱs² + 1 − ᾱ), and the
    probability-flow ODE maps x_T to x_T·s/√(ᾱ_T s² + 1 − ᾱ_T). DDIM (first order) and DPM-Solver++(2M)
    (second order) must converge to it, the latter faster.
  * A finite data set: the exact ε comes from the softmax-weighted mean of the data points; every
    sampler must land on (near) one of them.
"""
from __future__ import annotations


import pytest
import torch

from shared.errors import UserError
from shared.diffusion.guidance import cfg_combine, model_eps
from shared.diffusion.schedule import NoiseSchedule
from shared.diffusion.noise import per_sample_noise
from shared.model.unet import UNet
from tests.tiny_trained import bar_patterns, one_thread, trained_tiny_model, draw  # noqa: F401 (fixture)


class GaussianOracle(torch.nn.Module):
    """Exact ε for data x0 ~ N(0, std² I) of shape [1 x 4 x 4]."""

    in_channels, image_size, num_classes = 1, 4, 0

    def __init__(self, schedule: NoiseSchedule, std: float):
        super().__init__()
        self.alphas_cumprod, self.std = schedule.alphas_cumprod, std
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device

    def forward(self, x, t, y=None):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ((1 - abar).sqrt() * x.double() / (abar * self.std ** 2 + 1 - abar)).to(x.dtype)


class EmpiricalOracle(torch.nn.Module):
    """Exact ε for the empirical distribution of `data` [K x 1 x H x W]."""

    in_channels, num_classes = 1, 0

    def __init__(self, schedule: NoiseSchedule, data: torch.Tensor):
        super().__init__()
        self.alphas_cumprod, self.data = schedule.alphas_cumprod, data.double().flatten(1)
        self.image_size = data.shape[-1]
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        abar = self.alphas_cumprod[t].view(-1, 1)
        flat = x.double().flatten(1)                                          # (N, D)
        sq = ((flat[:, None] - abar.sqrt()[:, None] * self.data[None]) ** 2).sum(-1)  # (N, K)
        weights = (-sq / (2 * (1 - abar))).softmax(dim=1)
        x0 = weights @ self.data                                              # (N, D)
        return ((flat - abar.sqrt() * x0) / (1 - abar).sqrt()).view_as(x).to(x.dtype)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ode_samplers_converge_to_the_flow_solution(kind):
    schedule, std, seeds = NoiseSchedule(kind, 1000), 0.5, list(range(6))
    oracle = GaussianOracle(schedule, std)
    x_T = per_sample_noise(seeds, (1, 4, 4), "cpu", torch.float32, 0).double()
    abar_T = schedule.alphas_cumprod[-1]
    exact = (x_T * std / (abar_T * std ** 2 + 1 - abar_T).sqrt()).float()
    err = {(name, steps): (draw(oracle, schedule, seeds, sampler=name, num_steps=steps, progress=False)
                           - exact).abs().max().item()
           for name in ("ddim", "dpmpp") for steps in (10, 20, 50)}
    for name in ("ddim", "dpmpp"):
        assert err[name, 50] < err[name, 20] < err[name, 10]
    # second order beats first order, by a wide margin once the steps are not too coarse
    assert err["dpmpp", 20] < 0.5 * err["ddim", 20]
    assert err["dpmpp", 50] < 0.1 * err["ddim", 50] and err["dpmpp", 50] < 5e-3


@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddpm", 10), ("ddim", 10), ("dpmpp", 10)])
def test_samplers_land_on_the_data_with_an_exact_denoiser(name, steps):
    data, _ = bar_patterns(20, seed=3)
    schedule = NoiseSchedule("linear", 100)
    x = draw(EmpiricalOracle(schedule, data), schedule, [1, 2, 3, 4], sampler=name, num_steps=steps,
               progress=False)
    nearest = ((x.flatten(1)[:, None] - data.flatten(1)[None]) ** 2).mean(-1).min(dim=1).values
    assert nearest.max() < 1e-3, nearest


@pytest.fixture(scope="module")
def random_cond_model():
    torch.manual_seed(0)
    model = UNet.from_preset("tiny", image_size=8, attention_resolutions=(4,), num_classes=3)
    # a zero-initialised output layer would make ε ≡ 0; random weights make the test meaningful
    torch.nn.init.normal_(model.out_conv.weight, std=0.1)
    return model.eval()


@pytest.mark.parametrize("name,steps,eta", [("ddpm", None, 0.0), ("ddim", 5, 0.5), ("dpmpp", 5, 0.0)])
def test_per_sample_seeds_do_not_depend_on_the_batch(random_cond_model, name, steps, eta):
    schedule = NoiseSchedule("linear", 20)
    kw = dict(sampler=name, num_steps=steps, eta=eta, guidance_scale=2.5, progress=False)
    together = draw(random_cond_model, schedule, [11, 12, 13], labels=[0, 1, 2], batch_size=3, **kw)
    one_by_one = draw(random_cond_model, schedule, [11, 12, 13], labels=[0, 1, 2], batch_size=1, **kw)
    alone = draw(random_cond_model, schedule, [12], labels=[1], **kw)
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)
    other_seed = draw(random_cond_model, schedule, [99], labels=[1], **kw)
    assert (other_seed - alone).abs().max() > 1e-2


def test_cfg_w0_and_w1_are_the_unconditional_and_conditional_predictions(random_cond_model):
    model = random_cond_model
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    null = torch.full_like(labels, model.null_class)
    with torch.no_grad():
        eps_c, eps_u = model(x, 7, labels), model(x, 7, null)
    for w, expected in ((0.0, eps_u), (1.0, eps_c)):
        eps, second = model_eps(model, x, 7, labels, w)
        assert second is None
        torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-6)
    # any other w: one batched forward of 2N, combined as ε_u + w(ε_c − ε_u)
    eps, second = model_eps(model, x, 7, labels, 3.0)
    torch.testing.assert_close(cfg_combine(eps, second, 3.0), eps_u + 3.0 * (eps_c - eps_u),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cfg_combine(eps_c, eps_u, 0.0), eps_u)
    torch.testing.assert_close(cfg_combine(eps_c, eps_u, 1.0), eps_c)


def test_callback_sees_every_step_with_x0(random_cond_model):
    schedule, seen = NoiseSchedule("linear", 30), []
    out = draw(random_cond_model, schedule, [1, 2], labels=[0, 2], sampler="ddim", num_steps=6,
                 clip_x0=True, callback=lambda i, t, x_t, x0: seen.append((i, t, x_t.shape, float(x0.abs().max()))),
                 progress=False)
    assert [s[0] for s in seen] == list(range(6))
    assert [s[1] for s in seen] == [29, 24, 19, 14, 9, 4]  # trailing spacing of T = 30, S = 6
    assert all(s[2] == (2, 1, 8, 8) and s[3] <= 1.0 for s in seen)
    assert out.abs().max() <= 1.0  # the last DDIM step lands on the clipped x̂0


def test_respaced_ddpm_is_ddim_with_eta_one(random_cond_model):
    schedule = NoiseSchedule("cosine", 40)
    a = draw(random_cond_model, schedule, [3, 4], labels=[1, 1], sampler="ddpm", num_steps=8, progress=False)
    b = draw(random_cond_model, schedule, [3, 4], labels=[1, 1], sampler="ddim", num_steps=8, eta=1.0,
               progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_sampler_arguments_are_user_errors(random_cond_model):
    schedule = NoiseSchedule("linear", 20)
    for kw, match in ((dict(sampler="lms"), "unknown sampler"), (dict(num_steps=21), "steps must lie"),
                      (dict(labels=[3]), "labels must lie"), (dict(labels=[0, 1]), "2 labels given"),
                      (dict(spacing="karras"), "spacing"), (dict(precision="fp8"), "precision")):
        with pytest.raises(UserError, match=match):
            draw(random_cond_model, schedule, [0], progress=False, **kw)


def test_trained_tiny_model_samples_are_in_range():
    """A tiny model after a few hundred steps on bar patterns (background −1, one bright bar): DDPM
    samples are finite, near the data range, and mostly background; clipped DDIM / DPM-Solver++
    samples lie in [−1, 1]."""
    model, schedule = trained_tiny_model()
    labels = list(range(10))
    x = draw(model, schedule, range(10), labels=labels, sampler="ddpm", progress=False)
    assert torch.isfinite(x).all() and x.abs().max() < 3.0
    assert x.median() < -0.7  # the data are ~85 % background at −1
    for name in ("ddim", "dpmpp"):
        x = draw(model, schedule, range(10), labels=labels, sampler=name, num_steps=10, clip_x0=True,
                   guidance_scale=2.0, progress=False)
        assert x.abs().max() <= 1.0 + 1e-6


def _fused_skip_reason() -> str | None:
    import kernels

    try:
        kernels.load("ddpm_step")
        kernels.load("ddim_step")
    except kernels.FusedKernelsUnavailable as err:
        return f"the fused sampling step cannot be built here: {err}"
    return None


@pytest.mark.skipif(_fused_skip_reason() is not None, reason=str(_fused_skip_reason()))
@pytest.mark.parametrize("name,steps,eta,w", [("ddpm", None, 0.0, 2.0), ("ddim", 6, 0.3, 2.0),
                                              ("dpmpp", 6, 0.0, 3.0), ("ddim", 6, 0.0, 1.0)])
def test_fused_step_matches_the_eager_step(random_cond_model, name, steps, eta, w):
    schedule = NoiseSchedule("linear", 20)
    kw = dict(labels=[0, 1, 2], sampler=name, num_steps=steps, eta=eta, guidance_scale=w, clip_x0=True,
              progress=False)
    eager = draw(random_cond_model, schedule, [5, 6, 7], **kw)
    fused = draw(random_cond_model, schedule, [5, 6, 7], fused_step=True, **kw)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def test_fused_step_unavailable_is_a_clear_error(random_cond_model, monkeypatch):
    """When the fused module cannot load, fused_step=True raises FusedKernelsUnavailable, never falls back."""
    import kernels

    def refuse(name):
        raise kernels.FusedKernelsUnavailable(f"fused kernel {name!r} is unavailable: test")

    monkeypatch.setattr(kernels, "load", refuse)
    with pytest.raises(kernels.FusedKernelsUnavailable, match="unavailable"):
        draw(random_cond_model, NoiseSchedule("linear", 10), [0], labels=[0], fused_step=True, progress=False)


def test_bf16_autocast_stays_close_to_fp32(random_cond_model):
    schedule = NoiseSchedule("linear", 20)
    kw = dict(labels=[0, 1], sampler="ddim", num_steps=4, guidance_scale=2.0, clip_x0=True, progress=False)
    full = draw(random_cond_model, schedule, [1, 2], **kw)
    half = draw(random_cond_model, schedule, [1, 2], precision="bf16", **kw)
    assert half.dtype == torch.float32  # the chain itself stays in fp32; only the U-Net is autocast
    assert (half - full).abs().max() < 0.1 and (half - full).abs().max() > 0
