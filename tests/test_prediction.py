"""v- and x0-prediction (Salimans & Ho 2022): the conversions against float64 closed forms, the training
target and its min-SNR weights (Hang et al. 2023), every sampler against diffusers' schedulers with
prediction_type="v_prediction", the same denoiser sampled as an ε-, v- or x0-network (every sampler, the
fused step), the checkpoint record (old files are ε), a --prediction v training run, and the export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared import UNet, UserError
from shared.diffusion.forward import q_sample
from shared.diffusion.prediction import (eps_coefficients, eps_from_output, prediction_of, set_prediction,
                                         training_target)
from shared.diffusion.schedule import NoiseSchedule
from shared.records.checkpoint import EMA_NAME, atomic_save, ema_file, load_checkpoint, load_for_sampling
from shared.training.config import TrainConfig, merge_resume_options
from shared.training.loop import train
from shared.training.loss import l_simple, min_snr_weight
from tests.scheduler_parity import AsPrediction, lockstep
from tests.stage3_helpers import edge_bar_dataset
from tests.tiny_trained import draw, one_thread, trained_tiny_model  # noqa: F401 (fixture)

SCHEDULE = NoiseSchedule("linear", 1000)


def _draws(shape=(4, 1, 6, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1, torch.randn(shape, generator=gen,
                                                                                      dtype=torch.float64)


@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_v_and_x0_outputs_convert_back_to_the_true_eps(t):
    """x_t = α x0 + σ ε; v = α ε − σ x0 (Salimans & Ho 2022): ε = σ x_t + α v, and ε = (x_t − α x0)/σ."""
    x0, eps = _draws()
    abar = float(SCHEDULE.alphas_cumprod[t])
    alpha, sigma = abar ** 0.5, (1 - abar) ** 0.5
    x_t = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0
    for prediction, output in (("v", v), ("x0", x0)):
        got = eps_from_output(output, x_t, eps_coefficients(prediction, abar))
        torch.testing.assert_close(got, eps, rtol=0, atol=1e-9 if t else 1e-7)  # x0 at t = 0 divides by σ = 0.01
    assert eps_coefficients("eps", abar) is None and eps_from_output(eps, x_t, None) is eps
    with pytest.raises(ValueError, match="alpha_bar"):
        eps_coefficients("x0", 1.0)


def test_training_targets_and_l_simple():
    """The loss regresses the network's own target: ε, v = α ε − σ x0, or x0 (checked in float64)."""
    x0, eps = _draws(seed=1)
    t = torch.tensor([0, 10, 500, 999])
    alpha = SCHEDULE.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = SCHEDULE.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0}
    for prediction, target in expected.items():
        torch.testing.assert_close(training_target(prediction, x0, eps, alpha, sigma), target, rtol=0, atol=1e-12)

    class Constant(torch.nn.Module):
        """Outputs a fixed tensor: the loss is then the MSE against the target, computable by hand."""

        def __init__(self, value, prediction):
            super().__init__()
            self.value = value
            set_prediction(self, prediction)

        def forward(self, x, t, y=None):
            return self.value

    guess = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)).float()
    for prediction, target in expected.items():
        got = l_simple(Constant(guess, prediction), SCHEDULE, x0.float(), None, t, eps.float())
        torch.testing.assert_close(got.double(), ((guess.double() - target) ** 2).flatten(1).mean(1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_per_target_weigh_the_x0_error_alike(gamma):
    """Hang et al. 2023: min(SNR, γ) for x0, min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v (float64);
    an x0 error δ is an ε error √SNR·δ and a v error δ/σ, so each weighted squared error is min(SNR, γ)·δ²."""
    t = torch.arange(1000)
    abar = np.cumprod(1 - SCHEDULE.betas.numpy())
    snr = abar / (1 - abar)
    closed = {"x0": np.minimum(snr, gamma), "eps": np.minimum(snr, gamma) / snr,
              "v": np.minimum(snr, gamma) / (snr + 1)}
    per_unit_x0_error = {"x0": np.ones_like(snr), "eps": snr, "v": 1 / (1 - abar)}  # (d target / d x0)²
    for prediction, expected in closed.items():
        got = min_snr_weight(SCHEDULE, t, gamma, prediction).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=2e-6)
        np.testing.assert_allclose(got * per_unit_x0_error[prediction], np.minimum(snr, gamma), rtol=2e-6)
    assert torch.equal(min_snr_weight(SCHEDULE, t, gamma), min_snr_weight(SCHEDULE, t, gamma, "eps"))


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp", "euler", "heun"])
def test_every_sampler_matches_diffusers_with_v_prediction(name):
    """Each network call of a v-network within 1e-5 of diffusers' scheduler with prediction_type="v_prediction"
    (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler(dpmsolver++, order 2), Euler/Heun Karras)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")
    model, schedule = trained_tiny_model()
    net = set_prediction(AsPrediction(model, schedule, "v"), "v")
    steps = {"ddpm": schedule.num_timesteps, "ddim": 20, "dpmpp": 10}.get(name, 10)
    errors = lockstep(diffusers, net, schedule, name, steps, labels=torch.tensor([1, 5, 8]))
    assert max(errors) <= 1e-5, errors
    if name == "ddim":  # and with η > 0 (the same noise on both sides)
        assert max(lockstep(diffusers, net, schedule, name, steps, labels=torch.tensor([1, 5, 8]), eta=0.7)) <= 1e-5


@pytest.mark.parametrize("name, steps", [("ddpm", None), ("ddpm", 10), ("ddim", 10), ("dpmpp", 10),
                                         ("euler", 10), ("heun", 6)])
def test_the_same_denoiser_as_eps_v_or_x0_network_samples_the_same_images(name, steps):
    """Sampling honours the prediction type everywhere: the trained ε-network and its exact v- and
    x0-rewritings draw the same images, with guidance, clipping and, where it can run, the fused step."""
    model, schedule = trained_tiny_model()
    kw = dict(labels=[0, 3, 6], sampler=name, num_steps=steps, guidance_scale=2.0, clip_x0=True)
    reference = draw(model, schedule, [7, 8, 9], **kw)
    for prediction in ("v", "x0"):
        net = set_prediction(AsPrediction(model, schedule, prediction), prediction)
        torch.testing.assert_close(draw(net, schedule, [7, 8, 9], **kw), reference, rtol=1e-4, atol=2e-4)
    if _fused_available():
        net = set_prediction(AsPrediction(model, schedule, "v"), "v")
        torch.testing.assert_close(draw(net, schedule, [7, 8, 9], fused_step=True, **kw), reference,
                                   rtol=1e-4, atol=2e-4)


def _fused_available() -> bool:
    import kernels

    try:
        kernels.load("ddpm_step")
        kernels.load("ddim_step")
    except kernels.FusedKernelsUnavailable:
        return False
    return True


def _ema_checkpoint(folder, meta_extra: dict) -> None:
    model = UNet.from_preset("tiny", image_size=8, attention_resolutions=(4,))
    schedule = NoiseSchedule("linear", 20)
    meta = {"dataset": "mnist", "num_classes": 0, "image_shape": [1, 8, 8], "schedule": schedule.to_dict(),
            **meta_extra}
    folder.mkdir()
    atomic_save(ema_file(model.config, model.state_dict(), schedule.to_dict(), meta), folder / EMA_NAME)


def test_checkpoints_record_the_prediction_and_old_ones_are_eps(tmp_path):
    _ema_checkpoint(tmp_path / "old", {})  # written before the option existed
    model, _, meta = load_for_sampling(tmp_path / "old")
    assert prediction_of(model) == "eps" == meta["prediction"]
    _ema_checkpoint(tmp_path / "v", {"prediction": "v"})
    model, _, meta = load_for_sampling(tmp_path / "v")
    assert prediction_of(model) == "v" == meta["prediction"]
    _ema_checkpoint(tmp_path / "bad", {"prediction": "score"})
    with pytest.raises(UserError, match="damaged prediction record.*score"):
        load_for_sampling(tmp_path / "bad")


def test_a_v_prediction_run_trains_records_and_resumes_as_v(tmp_path):
    cfg = TrainConfig(preset="tiny", timesteps=50, batch_size=8, heldout_size=8, judge_heldout=0, log_every=2,
                      eval_every=4, sample_every=10_000, sample_steps=2, device="cpu", precision="fp32",
                      out=str(tmp_path / "runs"), seed=3, ckpt_every=4, max_steps=4, prediction="v",
                      min_snr_gamma=5.0)
    result = train(cfg, edge_bar_dataset(64))
    run = result.run_dir
    assert prediction_of(result.ema) == "v" == prediction_of(result.model)
    for name in ("ema.pt", "last.pt"):
        assert load_checkpoint(run / name)["meta"]["prediction"] == "v"
    assert json.loads((run / "options.json").read_text())["options"]["prediction"] == "v"
    model, _, _ = load_for_sampling(run)
    assert prediction_of(model) == "v"
    saved = load_checkpoint(run / "last.pt")["options"]
    with pytest.raises(UserError, match="--prediction eps does not match"):
        merge_resume_options(TrainConfig(prediction="eps"), saved, "last.pt", given={"prediction"})
    assert merge_resume_options(TrainConfig(), {k: v for k, v in saved.items() if k != "prediction"},
                                "old.pt").prediction == "eps"  # a checkpoint from before the option


def test_the_export_writes_diffusers_prediction_type_and_its_step_agrees(tmp_path):
    """DDPMScheduler from the exported folder, stepping a v-network's output, lands where our sampler does."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")
    pytest.importorskip("safetensors", reason="the export writes safetensors")
    from shared.model.export_diffusers import export_diffusers
    from shared.diffusion.samplers import SamplerOptions, make_sampler

    schedule = NoiseSchedule("linear", 50)
    model = set_prediction(UNet.from_preset("tiny", image_size=8, attention_resolutions=(4,)), "v")
    export_diffusers(model, schedule.betas, tmp_path / "pipe")
    config = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    ref = diffusers.DDPMScheduler.from_pretrained(tmp_path / "pipe" / "scheduler")
    ours = make_sampler(schedule, SamplerOptions(sampler="ddpm", clip_x0=True))
    x0, noise = _draws((3, 1, 8, 8), seed=4)
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    for i, t in enumerate((49, 20, 0)):
        x_t = q_sample(schedule, x0, t, noise).float()
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        eps = eps_from_output(v, x_t, eps_coefficients("v", float(schedule.alphas_cumprod[t])))
        mine, _ = ours.step(ours.timesteps.index(t), x_t, eps, z if t > 0 else None)
        theirs = ref.step(v, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    for prediction, expected in (("eps", "epsilon"), ("x0", "sample")):
        export_diffusers(set_prediction(UNet.from_preset("tiny"), prediction), schedule.betas, tmp_path / prediction)
        scheduler = json.loads((tmp_path / prediction / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["prediction_type"] == expected
