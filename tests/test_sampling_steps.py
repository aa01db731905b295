"""The eager DDPM/DDIM steps against closed forms in float64, and the respaced timestep lists.

References are written independently of the steps' own code (kernels/sampling_step/): they use the papers' own forms
(DDPM Algorithm 2's 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε), the posterior of DDPM Eq. 7 from β directly, the
marginal q(x_s | x0) that DDIM η = 0 must hit with the true noise) and plain Python floats.
"""
from __future__ import annotations

import math

import pytest
import torch

from shared.diffusion.forward import q_sample
from shared.diffusion.steps import ddim_step, ddim_timesteps, ddpm_step
from shared.diffusion.schedule import NoiseSchedule

SHAPE = (3, 2, 5, 4)  # odd sizes on purpose
FLOAT64_ULP = 2.0 ** -52


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule(request.param, 1000)


def _draw(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    z = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    return x0.to(dtype), eps.to(dtype), z.to(dtype)


def _f(tensor_1d: torch.Tensor, t: int) -> float:
    return float(tensor_1d[t])


# --------------------------------------------------------------------------------------------------
# DDPM


@pytest.mark.parametrize("t", [999, 500, 37, 1])
def test_ddpm_mean_equals_algorithm2_form(schedule, t):
    """Without clipping, c1·x̂0 + c2·x_t is Algorithm 2's 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε)."""
    x0, eps, _ = _draw(t)
    x_t = q_sample(schedule, x0, t, eps)
    beta, alpha, abar = _f(schedule.betas, t), 1 - _f(schedule.betas, t), _f(schedule.alphas_cumprod, t)
    expected = (x_t - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
    got = ddpm_step(schedule, x_t, eps, t).x_prev  # noise=None: the mean
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t", [999, 123, 1])
def test_ddpm_mean_with_true_noise_is_the_posterior_mean(schedule, t):
    """With ε the true noise, the step's mean is μ̃_t(x_t, x0) of DDPM Eq. 7, built from β here."""
    x0, eps, _ = _draw(100 + t)
    x_t = q_sample(schedule, x0, t, eps)
    betas = schedule.betas.tolist()
    abar_t = math.prod(1 - b for b in betas[: t + 1])
    abar_prev = math.prod(1 - b for b in betas[:t])
    coef_x0 = math.sqrt(abar_prev) * betas[t] / (1 - abar_t)
    coef_xt = math.sqrt(1 - betas[t]) * (1 - abar_prev) / (1 - abar_t)
    torch.testing.assert_close(ddpm_step(schedule, x_t, eps, t).x_prev, coef_x0 * x0 + coef_xt * x_t,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_noise_scale(schedule, variance):
    t = 400
    x0, eps, z = _draw(7)
    x_t = q_sample(schedule, x0, t, eps)
    beta, abar, abar_prev = (_f(schedule.betas, t), _f(schedule.alphas_cumprod, t),
                             _f(schedule.alphas_cumprod, t - 1))
    var = beta * (1 - abar_prev) / (1 - abar) if variance == "fixed_small" else beta
    mean = ddpm_step(schedule, x_t, eps, t, variance=variance).x_prev
    got = ddpm_step(schedule, x_t, eps, t, noise=z, variance=variance).x_prev
    torch.testing.assert_close(got - mean, math.sqrt(var) * z, rtol=1e-9, atol=1e-12)


def test_ddpm_last_step_adds_no_noise_and_lands_on_x0(schedule):
    """At t = 0: ᾱ_{−1} = 1 gives c1 = 1, c2 = 0, and no noise is added, so x_{−1} = x̂0."""
    x0, eps, z = _draw(3)
    x_t = q_sample(schedule, x0, 0, eps)
    out, x0_pred = ddpm_step(schedule, x_t, eps, 0, noise=z)
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_pred, x0, rtol=1e-9, atol=1e-9)


def test_ddpm_per_sample_t_matches_scalar_calls(schedule):
    x0, eps, z = _draw(11)
    t = torch.tensor([0, 5, 999])
    x_t = q_sample(schedule, x0, t, eps)
    batched = ddpm_step(schedule, x_t, eps, t, noise=z, clip_x0=True).x_prev
    for i, ti in enumerate(t.tolist()):
        single = ddpm_step(schedule, x_t[i:i + 1], eps[i:i + 1], ti, noise=z[i:i + 1], clip_x0=True).x_prev
        torch.testing.assert_close(batched[i:i + 1], single, rtol=0, atol=0)
    # row 0 had t = 0: no noise
    torch.testing.assert_close(batched[0:1], ddpm_step(schedule, x_t[:1], eps[:1], 0, clip_x0=True).x_prev)


def test_ddpm_clip_uses_clipped_x0(schedule):
    t = 50
    x0, eps, _ = _draw(5)
    x_t = q_sample(schedule, 3 * x0, t, eps)  # |x0| up to 3: clipping bites
    abar, abar_prev, beta = (_f(schedule.alphas_cumprod, t), _f(schedule.alphas_cumprod, t - 1),
                             _f(schedule.betas, t))
    x0_hat = ((x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
    expected = (math.sqrt(abar_prev) * beta / (1 - abar) * x0_hat
                + math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x_t)
    out, x0_pred = ddpm_step(schedule, x_t, eps, t, clip_x0=True)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    assert x0_pred.abs().max() <= 1.0


# --------------------------------------------------------------------------------------------------
# DDIM


@pytest.mark.parametrize("t,t_prev", [(999, -1), (999, 0), (500, 250), (10, 9), (1, -1)])
def test_ddim_eta0_with_true_noise_hits_the_marginal(schedule, t, t_prev):
    """η = 0 with the true ε maps x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε onto √ᾱ_s x0 + √(1−ᾱ_s) ε exactly;
    with t_prev = −1 that is x0 itself."""
    x0, eps, z = _draw(t)
    x_t = q_sample(schedule, x0, t, eps)
    expected = x0 if t_prev < 0 else q_sample(schedule, x0, t_prev, eps)
    out, x0_pred = ddim_step(schedule, x_t, eps, t, t_prev, eta=0.0, noise=z)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_pred, x0, rtol=1e-9, atol=1e-9)


def test_ddim_sigma_is_eq16(schedule):
    t, s, eta = 700, 350, 0.7
    x0, eps, z = _draw(21)
    x_t = q_sample(schedule, x0, t, eps)
    a_t, a_s = _f(schedule.alphas_cumprod, t), _f(schedule.alphas_cumprod, s)
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
    x0_hat = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_s) * x0_hat + math.sqrt(1 - a_s - sigma ** 2) * eps + sigma * z
    torch.testing.assert_close(ddim_step(schedule, x_t, eps, t, s, eta=eta, noise=z).x_prev, expected,
                               rtol=1e-9, atol=1e-9)


def test_ddim_eta1_one_step_apart_is_ddpm(schedule):
    """With t_prev = t − 1 and η = 1, σ_t² = β̃_t and Eq. 12 is the DDPM posterior step."""
    x0, eps, z = _draw(8)
    t = 321
    x_t = q_sample(schedule, x0, t, eps + 0.1)  # a model that is a little wrong
    torch.testing.assert_close(ddim_step(schedule, x_t, eps, t, t - 1, eta=1.0, noise=z).x_prev,
                               ddpm_step(schedule, x_t, eps, t, noise=z).x_prev, rtol=1e-9, atol=1e-9)


def test_ddim_clip_recomputes_eps(schedule):
    t, s = 600, 200
    x0, eps, _ = _draw(9)
    x_t = q_sample(schedule, 3 * x0, t, eps)
    a_t, a_s = _f(schedule.alphas_cumprod, t), _f(schedule.alphas_cumprod, s)
    x0_hat = ((x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
    eps_hat = (x_t - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)
    expected = math.sqrt(a_s) * x0_hat + math.sqrt(1 - a_s) * eps_hat
    torch.testing.assert_close(ddim_step(schedule, x_t, eps, t, s, clip_x0=True).x_prev, expected,
                               rtol=1e-9, atol=1e-9)


def test_ddim_per_sample_timesteps_with_final_minus_one(schedule):
    x0, eps, z = _draw(13)
    t = torch.tensor([999, 40, 3])
    t_prev = torch.tensor([500, -1, 2])
    x_t = q_sample(schedule, x0, t, eps)
    batched = ddim_step(schedule, x_t, eps, t, t_prev, eta=0.5, noise=z).x_prev
    for i in range(3):
        single = ddim_step(schedule, x_t[i:i + 1], eps[i:i + 1], int(t[i]), int(t_prev[i]), eta=0.5,
                           noise=z[i:i + 1]).x_prev
        # An int t takes its square roots on the host (math.sqrt, correctly rounded), a tensor t with
        # torch's vectorised sqrt (within one float64 ulp): the float64 results agree to a few ulps.
        torch.testing.assert_close(batched[i:i + 1], single, rtol=4 * FLOAT64_ULP, atol=4 * FLOAT64_ULP)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_steps_keep_input_dtype_and_match_float64(schedule, dtype, tol):
    x0, eps, z = _draw(17)
    t = 250
    x_t = q_sample(schedule, x0, t, eps)
    for step in (lambda x, e, n: ddpm_step(schedule, x, e, t, noise=n, clip_x0=True).x_prev,
                 lambda x, e, n: ddim_step(schedule, x, e, t, 100, eta=0.3, noise=n, clip_x0=True).x_prev):
        ref = step(x_t, eps, z)
        low = step(x_t.to(dtype), eps.to(dtype), z.to(dtype))
        assert low.dtype == dtype
        torch.testing.assert_close(low.double(), ref, rtol=tol, atol=tol * 10)


def test_bad_inputs_raise_clear_errors(schedule):
    x0, eps, _ = _draw(0, torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        ddpm_step(schedule, x0, eps[:1], 5)
    with pytest.raises(ValueError, match="outside"):
        ddpm_step(schedule, x0, eps, 1000)
    with pytest.raises(ValueError, match="variance"):
        ddpm_step(schedule, x0, eps, 5, variance="learned")
    with pytest.raises(ValueError, match="entries for a batch"):
        ddpm_step(schedule, x0, eps, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="smaller than"):
        ddim_step(schedule, x0, eps, 5, 5)
    with pytest.raises(ValueError, match="outside"):
        ddim_step(schedule, x0, eps, 5, -2)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(schedule, x0, eps, 5, 1, eta=-0.1)


# --------------------------------------------------------------------------------------------------
# respacing: hand-checked against diffusers' DDIMScheduler.set_timesteps formulas
#   trailing  round(arange(T, 0, −T/S)) − 1;  leading  arange(S)·(T//S) reversed;
#   linspace  round(linspace(0, T−1, S)) reversed;  numpy rounds half to even (4.5 → 4, 7.5 → 8).

SPACING_CASES = [
    # T, S, trailing, leading, linspace
    (1000, 1, [999], [0], [0]),
    # T/S = 333.33…: 1000, 666.67, 333.33 → 1000, 667, 333;  linspace 0, 499.5, 999 → 499.5 → 500
    (1000, 3, [999, 666, 332], [666, 333, 0], [999, 500, 0]),
    (1000, 10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
     [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
     [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    # 7 ∤ 1000. trailing: 1000 − i·142.857… = 857.14, 714.29, 571.43, 428.57, 285.71, 142.86;
    # leading stride 142; linspace step 166.5: 166.5 → 166, 499.5 → 500, 832.5 → 832
    (1000, 7, [999, 856, 713, 570, 428, 285, 142], [852, 710, 568, 426, 284, 142, 0],
     [999, 832, 666, 500, 333, 166, 0]),
    # 4 ∤ 10: trailing 10, 7.5, 5, 2.5 → 10, 8, 5, 2 (half to even); leading stride 2
    (10, 4, [9, 7, 4, 1], [6, 4, 2, 0], [9, 6, 3, 0]),
    # 3 ∤ 10: trailing 10, 6.67, 3.33; linspace 0, 4.5, 9 → 4.5 → 4
    (10, 3, [9, 6, 2], [6, 3, 0], [9, 4, 0]),
]


@pytest.mark.parametrize("T,S,trailing,leading,linspace", SPACING_CASES)
def test_ddim_timesteps_hand_checked(T, S, trailing, leading, linspace):
    assert ddim_timesteps(T, S, "trailing") == trailing
    assert ddim_timesteps(T, S, "leading") == leading
    assert ddim_timesteps(T, S, "linspace") == linspace


def test_ddim_timesteps_all_steps_is_the_full_chain():
    full = list(range(999, -1, -1))
    for spacing in ("trailing", "leading", "linspace"):
        assert ddim_timesteps(1000, 1000, spacing) == full


@pytest.mark.parametrize("T", [1000, 17, 1])
def test_ddim_timesteps_properties_for_every_count(T):
    """Every S in [1, T]: S strictly descending entries in [0, T); trailing and linspace start at
    T − 1, leading and linspace end at 0. (T = 17, S = 7 is where numpy's float arange would add −1.)"""
    for S in range(1, T + 1):
        for spacing in ("trailing", "leading", "linspace"):
            ts = ddim_timesteps(T, S, spacing)
            assert len(ts) == S and all(0 <= v < T for v in ts)
            assert all(a > b for a, b in zip(ts, ts[1:])), (T, S, spacing, ts)
        assert ddim_timesteps(T, S, "trailing")[0] == T - 1
        assert ddim_timesteps(T, S, "linspace")[0] == T - 1 or S == 1
        assert ddim_timesteps(T, S, "leading")[-1] == 0 and ddim_timesteps(T, S, "linspace")[-1] == 0
    assert ddim_timesteps(17, 7, "trailing") == [16, 14, 11, 9, 6, 4, 1]


def test_ddim_timesteps_rejects_bad_counts():
    with pytest.raises(ValueError, match="cannot exceed"):
        ddim_timesteps(10, 11)
    with pytest.raises(ValueError, match=">= 1"):
        ddim_timesteps(10, 0)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, 2, "karras")
