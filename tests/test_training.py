"""The trainer's pieces against independent references, and short training runs on generated data."""
from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from shared.records.checkpoint import load_checkpoint
from shared.model.ema import ema_decay_at, make_ema
from shared.errors import UserError
from shared.records.runs import LOG_COLUMNS, read_log
from shared.diffusion.schedule import NoiseSchedule
import shared.training.loop as training_loop
from shared.training.batches import ResumableSampler
from shared.training.config import TrainConfig, merge_resume_options
from shared.training.heldout import fixed_heldout_batch, heldout_loss, split_heldout
from shared.training.loop import lr_factor, train
from shared.training.state import capture_rng, restore_rng
from tests.stage3_helpers import NUM_CLASSES, edge_bar_dataset, one_thread  # noqa: F401 (autouse fixture)

# The loss must end below this fraction of its start: ε_θ = 0 at initialisation (zero output conv) gives
# L_simple ≈ 1, and the edge-bar data is learnable enough to more than halve it within LOSS_STEPS.
LOSS_FALL_FRACTION = 0.5
LOSS_STEPS = 200


def tiny_cfg(tmp_path, **overrides) -> TrainConfig:
    base = dict(preset="tiny", timesteps=100, batch_size=16, heldout_size=32, lr=1e-3, warmup_steps=10,
                sample_steps=2, sample_every=10_000, ckpt_every=10_000, eval_every=10_000, log_every=1,
                device="cpu", out=str(tmp_path / "runs"), max_steps=20, precision="fp32")
    base.update(overrides)
    return TrainConfig(**base)


def test_loss_falls_and_every_record_is_written(tmp_path):
    result = train(tiny_cfg(tmp_path, max_steps=LOSS_STEPS, eval_every=100), edge_bar_dataset(256))
    rows = read_log(result.run_dir / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, LOSS_STEPS + 1))
    losses = [float(r["loss"]) for r in rows]
    first = losses[0]
    last = sum(losses[-20:]) / 20  # the last 20 steps' mean, since a single step's loss is noisy
    assert 0.8 < first < 1.2, first  # ε_θ starts at 0, so MSE(ε, 0) ≈ E[ε²] = 1
    assert last < LOSS_FALL_FRACTION * first, (first, last)
    held = [float(r["heldout_loss"]) for r in rows if r["heldout_loss"]]
    assert len(held) == 2 and held[1] < held[0]  # evaluated at steps 100 and 200, and improving

    run = result.run_dir
    assert run.name == "00000-mnist-tiny-fp32"
    for name in ("options.json", "log.csv", "loss.png", "last.pt", "best.pt", "ema.pt",
                 f"samples-{LOSS_STEPS:07d}.png"):
        assert (run / name).is_file(), name
    record = json.loads((run / "options.json").read_text())
    assert record["options"]["max_steps"] == LOSS_STEPS and record["options"]["precision"] == "fp32"
    for key in ("torch", "triton", "cuda", "device"):
        assert key in record["environment"]
    assert list(rows[0]) == list(LOG_COLUMNS)
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["progress"]["step"] == LOSS_STEPS
    assert result.images_per_s > 0


def test_ema_update_matches_closed_form():
    """AveragedModel + the warm-up multi_avg_fn against the EMA recursion computed in float64."""
    decay, warmup = 0.9, 3
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model, decay, warmup)
    expected = {k: v.double().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for update in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        ema.update_parameters(model)
        for k, v in model.state_dict().items():
            if update == 0:  # the first update copies the weights
                expected[k] = v.double().clone()
            else:  # update n (n earlier ones): decay_n = min(decay, (1 + n) / (warmup + n))
                d = min(decay, (1 + update) / (warmup + update))
                expected[k] = d * expected[k] + (1 - d) * v.double()
        for k, v in ema.module.state_dict().items():
            torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-6)
    assert ema_decay_at(1, 0.999, 10) == pytest.approx(2 / 11)
    assert ema_decay_at(10**6, 0.999, 10) == 0.999
    assert ema_decay_at(5, 0.999, 0) == 0.999
    assert isinstance(ema, AveragedModel) and not any(p.requires_grad for p in ema.parameters())


def test_ema_counter_lives_on_the_model_device():
    """The update counter sits beside the weights (AveragedModel alone would leave it on the CPU, and a
    masked update on a GPU would then mix devices). The meta device stands in for a GPU here."""
    model = torch.nn.Linear(3, 2, device="meta")
    ema = make_ema(model)
    assert ema.n_averaged.device == model.weight.device == ema.module.weight.device
    ema.update_parameters(model, skip=torch.zeros((), dtype=torch.bool, device="meta"))
    assert ema.n_averaged.device.type == "meta"


def test_lr_warmup_and_cosine():
    assert lr_factor(0, 10, 100, cosine=False) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, cosine=False) == 1.0
    assert lr_factor(50, 10, 100, cosine=False) == 1.0
    assert lr_factor(10, 10, 110, cosine=True) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, cosine=True) == pytest.approx(0.5)  # half-way: (1 + cos π/2) / 2
    assert lr_factor(110, 10, 110, cosine=True) == pytest.approx(0.0, abs=1e-12)


def test_heldout_problem_is_fixed():
    """Same images, t and ε at every evaluation, so held-out losses compare across steps."""
    data = edge_bar_dataset(64)
    train_part, held = split_heldout(data, 16, seed=3)
    assert len(train_part) == 48 and len(held) == 16
    assert not set(train_part.indices) & set(held.indices)
    a = fixed_heldout_batch(held, 100, seed=3, device=torch.device("cpu"))
    b = fixed_heldout_batch(held, 100, seed=3, device=torch.device("cpu"))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    zero_model = lambda x, t, y=None: torch.zeros_like(x)  # noqa: E731
    loss = heldout_loss(zero_model, NoiseSchedule("linear", 100), a, False, 5, nullcontext())
    assert loss == pytest.approx(a[3].pow(2).mean().item(), rel=1e-6)  # MSE(ε, 0) = mean ε²


def test_rng_capture_restores_every_stream():
    gen, loader_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    state = capture_rng(gen, loader_gen)
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen),
             torch.rand(3, generator=loader_gen))
    restore_rng(state, gen, loader_gen)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen),
             torch.rand(3, generator=loader_gen))
    for u, v in zip(first, again):
        assert np.array_equal(np.asarray(u), np.asarray(v))


def test_resumable_sampler_skips_consumed_batches():
    data = list(range(20))
    full = ResumableSampler(data, 1, 0, seed=5)
    full.set_epoch(2)
    order = list(full)
    part = ResumableSampler(data, 1, 0, seed=5)
    part.set_epoch(2)
    part.start_batch(3, batch_size=4)
    assert list(part) == order[12:] and len(part) == 8
    other_epoch = ResumableSampler(data, 1, 0, seed=5)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != order


def test_class_cond_drops_labels_to_the_null_class(tmp_path):
    seen = []
    result_holder = {}

    def run(p_uncond):
        seen.clear()
        original = training_loop.build_model

        def build_and_hook(*args, **kwargs):
            model = original(*args, **kwargs)
            model.register_forward_pre_hook(lambda m, a: seen.append(a[2].clone()) if m.training else None)
            return model

        training_loop.build_model = build_and_hook
        try:
            result_holder["r"] = train(tiny_cfg(tmp_path, class_cond=True, p_uncond=p_uncond, max_steps=12,
                                                heldout_size=0), edge_bar_dataset(128))
        finally:
            training_loop.build_model = original
        return torch.cat(seen)

    labels = run(0.5)
    null = NUM_CLASSES
    frac = (labels == null).float().mean().item()
    assert 0.3 < frac < 0.7, frac  # 192 Bernoulli(0.5) draws
    assert set(labels[labels != null].tolist()) <= set(range(NUM_CLASSES))
    assert result_holder["r"].model.num_classes == NUM_CLASSES
    assert (run(0.0) != null).all()


class _TurnsNaN(torch.utils.data.Dataset):
    """Wraps a dataset; after `good_items` reads every image is NaN (a data pipeline going bad)."""

    def __init__(self, base, good_items):
        self.base, self.info, self.good_items, self.reads = base, base.info, good_items, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        x, y = self.base[i]
        return (x if self.reads <= self.good_items else torch.full_like(x, math.nan)), y


def test_nonfinite_steps_are_skipped_then_stop_keeps_last_good_checkpoint(tmp_path):
    batch, good_steps = 8, 4
    data = _TurnsNaN(edge_bar_dataset(128), good_items=batch * good_steps + 16)  # + the 16 held-out reads
    # Checkpoints at steps 4 and 8; the three skips (steps 5-7) stop the run before step 8.
    with pytest.raises(UserError, match="3 consecutive steps had a non-finite"):
        train(tiny_cfg(tmp_path, batch_size=batch, heldout_size=16, ckpt_every=4, max_consecutive_skips=3,
                       max_steps=50), data)
    run = next((tmp_path / "runs").iterdir())
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["progress"]["step"] == good_steps
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    rows = read_log(run / "log.csv")
    assert [int(r["skipped"]) for r in rows][-3:] == [1, 2, 3]
    assert rows[-1]["loss"] == ""  # no finite step in that row


def test_bf16_autocast_on_cpu_trains(tmp_path):
    result = train(tiny_cfg(tmp_path, precision="bf16", max_steps=3, heldout_size=0), edge_bar_dataset(64))
    assert result.run_dir.name.endswith("-bf16")
    assert math.isfinite(result.final_loss) and result.progress.skipped_total == 0


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train(tiny_cfg(tmp_path, precision="fp16"), edge_bar_dataset(64))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_options_come_from_the_checkpoint_and_must_agree():
    saved = {**TrainConfig(preset="tiny", max_steps=300, seed=4).__dict__}
    merged = merge_resume_options(TrainConfig(resume="x"), saved, "ck.pt")
    assert (merged.preset, merged.max_steps, merged.seed, merged.resume) == ("tiny", 300, 4, "x")
    extended = merge_resume_options(TrainConfig(max_steps=500), saved, "ck.pt")
    assert extended.max_steps == 500  # the length may change
    with pytest.raises(UserError, match="--preset cifar10 does not match .* trained with tiny"):
        merge_resume_options(TrainConfig(preset="cifar10"), saved, "ck.pt")


def test_early_stopping_on_a_flat_heldout_loss(tmp_path):
    """With an LR too small to move any float32 weight, the EMA never changes, so the held-out loss never
    improves after the first evaluation: patience 2 with an evaluation every 2 steps stops at step 6."""
    result = train(tiny_cfg(tmp_path, lr=1e-30, eval_every=2, early_stop_patience=2, max_steps=50),
                   edge_bar_dataset(64))
    assert result.stopped_early and result.progress.step == 6
    assert load_checkpoint(result.run_dir / "last.pt")["progress"]["step"] == 6
    held = [r["heldout_loss"] for r in read_log(result.run_dir / "log.csv") if r["heldout_loss"]]
    assert len(held) == 3 and len(set(held)) == 1


def test_epochs_and_channels_last(tmp_path):
    """--epochs counts whole passes (64 − 16 held out = 48 images = 3 batches of 16 per epoch)."""
    result = train(tiny_cfg(tmp_path, max_steps=None, epochs=2, heldout_size=16, channels_last=True),
                   edge_bar_dataset(64))
    assert result.progress.step == 6 and result.epochs_done == 2.0
    assert [int(r["epoch"]) for r in read_log(result.run_dir / "log.csv")] == [0, 0, 0, 1, 1, 1]
