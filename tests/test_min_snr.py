"""Min-SNR-γ loss weights (Hang et al. 2023) against a float64 computation from the betas, and their use
in the training step (the weighted mean of the per-image L_simple with the same draws)."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from shared.diffusion.schedule import NoiseSchedule
from shared.model.ema import make_ema
from shared.model.unet import UNet
from shared.training.loop import GradientStep
from shared.training.loss import l_simple, min_snr_weight
from shared.training.state import TrainState


def float64_weights(kind: str, gamma: float) -> np.ndarray:
    """w_t = min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 − ᾱ_t), ᾱ_t the float64 product of (1 − β_s)."""
    betas = NoiseSchedule(kind, 1000).betas.double().numpy()
    alpha_bar = np.cumprod(1.0 - betas)
    snr = alpha_bar / (1.0 - alpha_bar)
    return np.minimum(snr, gamma) / snr


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_weights_match_float64_closed_form(kind, gamma):
    t = torch.arange(1000)
    got = min_snr_weight(NoiseSchedule(kind, 1000), t, gamma)
    assert got.dtype == torch.float32 and got.shape == (1000,)
    np.testing.assert_allclose(got.double().numpy(), float64_weights(kind, gamma), rtol=1e-5, atol=1e-7)
    # the noisy end is untouched (SNR < γ), the clean end is down-weighted to about γ / SNR_0
    assert got[-1] == 1.0 and got[0] < 1e-2


def _state(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)  # lr 0: the weights stay as they are
    return TrainState(model, make_ema(model), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      torch.amp.GradScaler("cpu", enabled=False), torch.Generator().manual_seed(3),
                      torch.Generator(), torch.device("cpu"))


def test_training_step_weights_each_image_by_its_timestep():
    torch.manual_seed(0)
    model = UNet.from_preset("tiny", in_channels=1, image_size=8, num_classes=0)
    schedule, x0, y = NoiseSchedule("linear", 1000), torch.rand(16, 1, 8, 8) * 2 - 1, torch.zeros(16, dtype=torch.long)
    state = _state(model)
    loss, _, _ = GradientStep(state, model, schedule, nullcontext(), max_grad_norm=0.0, p_uncond=0.0,
                              min_snr_gamma=5.0)([(x0, y)])
    # the same draws (t, then ε) from a fresh generator with the same seed, weighted by hand
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (16,), generator=gen)
    per_image = l_simple(model, schedule, x0, None, t, generator=gen)
    expected = (per_image.double() * torch.from_numpy(float64_weights("linear", 5.0))[t]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain, _, _ = GradientStep(_state(model), model, schedule, nullcontext(), max_grad_norm=0.0,
                               p_uncond=0.0)([(x0, y)])
    assert plain.item() == pytest.approx(per_image.mean().item(), rel=1e-5) and plain.item() > loss.item()
