"""q_sample and the x_T ≈ N(0, I) check, against closed-form statistics."""
import pytest
import torch

from shared import NoiseSchedule, q_sample
from shared.diffusion.forward import prior_match_statistics
from shared.model.blocks import timestep_embedding


def test_q_sample_matches_formula_and_keeps_dtype():
    s = NoiseSchedule("linear", 1000)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    expected = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * x0.double() + \
        (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * eps.double()
    torch.testing.assert_close(q_sample(s, x0, t, eps).double(), expected, rtol=1e-6, atol=1e-6)
    assert q_sample(s, x0.half(), t, eps).dtype == torch.float16


@pytest.mark.parametrize("t", [50, 300, 700])
def test_q_sample_moments(t):
    """For fixed x0, x_t has mean √ᾱ_t·x0 and variance 1−ᾱ_t (DDPM Eq. 4)."""
    s = NoiseSchedule("cosine", 1000)
    gen = torch.Generator().manual_seed(t)
    x0 = torch.full((20_000, 1), 0.7, dtype=torch.float64)
    xt = q_sample(s, x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    ab = s.alphas_cumprod[t].item()
    n = xt.numel()
    assert abs(xt.mean().item() - ab ** 0.5 * 0.7) < 5 * ((1 - ab) / n) ** 0.5
    assert abs(xt.var().item() - (1 - ab)) < 5 * (1 - ab) * (2 / n) ** 0.5


def test_prior_check_passes_at_T_and_fails_with_signal_left():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    assert prior_match_statistics(NoiseSchedule("linear", 1000), x0, noise)["passed"]
    # Stopping at t = 99 (ᾱ ≈ 0.9) leaves the data visible: the check must notice.
    assert not prior_match_statistics(NoiseSchedule("linear", 1000), x0, noise, t=99)["passed"]


def test_timestep_embedding_properties():
    t = torch.tensor([0, 1, 10, 999])
    emb = timestep_embedding(t, 64)
    assert emb.shape == (4, 64)
    # cos² + sin² = 1 for each frequency; at t = 0 every cos is 1 and every sin 0.
    torch.testing.assert_close(emb[:, :32] ** 2 + emb[:, 32:] ** 2, torch.ones(4, 32))
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(32), torch.zeros(32)]))
    # The first frequency is 1 rad per step; distinct timesteps embed distinctly.
    torch.testing.assert_close(emb[2, 0], torch.cos(torch.tensor(10.0)))
    assert torch.cdist(emb, emb).fill_diagonal_(1).min() > 0.1
    assert timestep_embedding(t, 7).shape == (4, 7)
