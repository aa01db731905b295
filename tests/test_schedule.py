"""Noise schedules against their closed forms."""
import math

import pytest
import torch

from shared import NoiseSchedule, UserError, extract
from shared.diffusion.schedule import MAX_BETA


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 250, 37])
def test_monotone_and_in_range(kind, T):
    s = NoiseSchedule(kind, T)
    for name in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "log_snr"):
        value = getattr(s, name)
        assert value.dtype == torch.float64 and value.shape == (T,), name
        assert torch.isfinite(value).all(), name
    assert (s.betas > 0).all() and (s.betas <= MAX_BETA).all()
    assert (s.betas[1:] >= s.betas[:-1]).all(), "β must not decrease"
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all(), "ᾱ must strictly decrease"
    assert s.alphas_cumprod[-1] < 1e-3, "x_T must carry almost no signal"


def test_linear_endpoints_match_ddpm():
    s = NoiseSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's ᾱ_T


def test_cosine_matches_closed_form_alpha_bar():
    T, s_off = 1000, 0.008
    s = NoiseSchedule("cosine", T)
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):  # away from the clipped end, ᾱ_t = f(t+1)/f(0) exactly
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert s.betas.max().item() == pytest.approx(MAX_BETA)  # the cap is reached at the very end


def test_posterior_coefficients_closed_form():
    s = NoiseSchedule("linear", 100)
    ab, ab_prev, b = s.alphas_cumprod, s.alphas_cumprod_prev, s.betas
    torch.testing.assert_close(s.posterior_variance, b * (1 - ab_prev) / (1 - ab))
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance_clipped[0] == torch.log(s.posterior_variance[1])
    # The posterior mean of x_{t-1} is a convex-like mix: coef1·√ᾱ_t + coef2·... reproduces √ᾱ_{t-1} x0 on x_t's mean.
    torch.testing.assert_close(s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod,
                               ab_prev.sqrt())
    torch.testing.assert_close(s.log_snr, torch.log(ab / (1 - ab)))


def test_extract_gathers_and_broadcasts():
    s = NoiseSchedule("cosine", 50)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float16)
    t = torch.tensor([0, 7, 49])
    out = extract(s.alphas_cumprod, t, x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float16
    torch.testing.assert_close(out.flatten().double(), s.alphas_cumprod[t], atol=1e-3, rtol=1e-3)
    assert extract(s.betas, 5, x).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="outside"):
        extract(s.betas, 50, x)
    with pytest.raises(ValueError, match="for a batch of 3"):
        extract(s.betas, torch.tensor([1, 2]), x)


def test_bad_schedule_is_a_user_error():
    with pytest.raises(UserError, match="unknown schedule"):
        NoiseSchedule("quadratic", 10)
    with pytest.raises(UserError, match="integer >= 1"):
        NoiseSchedule("linear", 0)
