"""The training step's hot loop: no host sync between log rows, a non-finite step masked on the device,
and batches gathered on the device in exactly the DataLoader's order."""
from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shared.diffusion.schedule import NoiseSchedule
from shared.model.ema import make_ema
from shared.model.unet import UNet
from shared.training.batches import Batches
from shared.training.config import TrainConfig
from shared.training.heldout import split_heldout
from shared.training.loop import GradientStep, train
from shared.training.state import TrainState
from tests.stage3_helpers import NUM_CLASSES, ItemsOnly, SIZE, edge_bar_dataset, one_thread  # noqa: F401 (autouse fixture)

# Ops that make the host wait for the device: reading a value (item, bool, ==) or an output whose size
# depends on the data.
SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.nonzero",
            "aten.masked_select", "aten.unique", "aten._unique2", "aten.item"}


class HostSyncCounter(TorchDispatchMode):
    """Counts the dispatched ops that need a device-to-host read."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _syncs_of_run(tmp_path, steps: int) -> list[str]:
    """Host syncs of a whole run whose only log row, evaluation, checkpoint and grid are at its end."""
    cfg = TrainConfig(preset="tiny", timesteps=50, batch_size=8, heldout_size=16, max_steps=steps, log_every=10_000,
                      eval_every=10_000, ckpt_every=10_000, sample_every=10_000, sample_steps=2, device="cpu",
                      precision="fp32", out=str(tmp_path / f"runs{steps}"), judge_heldout=0)
    with HostSyncCounter() as counter:
        train(cfg, edge_bar_dataset(512))
    return counter.seen


def test_no_host_sync_between_log_rows(tmp_path):
    """A run of 2n steps makes exactly the host syncs of a run of n steps (the set-up, the one log row,
    evaluation, checkpoint and grid at the end): the n extra training steps make none."""
    short, long = _syncs_of_run(tmp_path, 6), _syncs_of_run(tmp_path, 12)
    assert len(short) > 0  # the counter does see the bookkeeping's reads
    assert len(long) == len(short), (len(long), len(short), sorted(set(long)))


def _state(seed: int = 0):
    torch.manual_seed(seed)
    model = UNet.from_preset("tiny", image_size=SIZE, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = TrainState(model, make_ema(model, 0.9, 0), optimizer, sched, torch.amp.GradScaler("cpu", enabled=False),
                       torch.Generator().manual_seed(seed), torch.Generator(), torch.device("cpu"))
    return state


def _snapshot(state: TrainState) -> dict:
    snap = {f"model.{k}": v.clone() for k, v in state.model.state_dict().items()}
    snap.update({f"ema.{k}": v.clone() for k, v in state.ema.state_dict().items()})
    for i, s in enumerate(state.optimizer.state.values()):
        snap.update({f"opt{i}.{k}": v.clone() for k, v in s.items()})
    return snap


def test_non_finite_step_changes_nothing_and_is_counted():
    """After two good steps, a NaN batch leaves weights, EMA (and its counter), Adam moments and step
    counts bit-identical, and counts a skip; the next good step updates again and resets the run."""
    state = _state()
    schedule = NoiseSchedule("linear", 50)
    data = edge_bar_dataset(32)
    x0 = data.images[:8].float() / 127.5 - 1
    y = data.labels[:8]
    gradient_step = GradientStep(state, state.model, schedule, nullcontext(), max_grad_norm=1.0, p_uncond=0.1)
    step = lambda x: gradient_step([(x, y)])  # noqa: E731
    for _ in range(2):
        loss, norm, skip = step(x0)
        assert not skip and math.isfinite(loss.item()) and math.isfinite(norm.item())
    before = _snapshot(state)
    loss, norm, skip = step(torch.full_like(x0, math.nan))
    assert bool(skip) and not math.isfinite(loss.item())
    after = _snapshot(state)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert state.sync_progress().skipped_total == 1 and state.progress.consecutive_skips == 1
    assert all(p.grad is None for p in state.model.parameters())
    loss, norm, skip = step(x0)
    assert not skip and state.sync_progress().consecutive_skips == 0
    assert int(state.ema.n_averaged) == 3
    changed = [k for k in before if k.startswith("model.") and not torch.equal(before[k], _snapshot(state)[k])]
    assert changed  # the good step moved the weights


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_device_batches_follow_the_dataloader_order(world_size, rank):
    """Epoch 3 from batch 2 on, through a held-out split: the same images and labels, bit for bit."""
    data = edge_bar_dataset(100, seed=4)
    train_set, _ = split_heldout(data, 12, seed=5)
    loader_train, _ = split_heldout(ItemsOnly(data), 12, seed=5)
    on_device = Batches(train_set, 8, world_size, rank, seed=9, device=torch.device("cpu"))
    by_loader = Batches(loader_train, 8, world_size, rank, seed=9, device=torch.device("cpu"))
    assert on_device.on_device and not by_loader.on_device
    a, b = list(on_device.epoch(3, 2)), list(by_loader.epoch(3, 2))
    assert len(a) == len(b) == on_device.steps_per_epoch - 2 > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: device-resident data and fused AdamW there")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_run_keeps_data_and_optimizer_on_the_device(tmp_path, precision):
    """On CUDA: the data on the device, fused AdamW masked by found_inf (with fp16's GradScaler too)."""
    cfg = TrainConfig(preset="tiny", timesteps=50, batch_size=8, heldout_size=16, max_steps=4, sample_steps=2,
                      device="cuda", out=str(tmp_path / "runs"), judge_heldout=0, precision=precision)
    result = train(cfg, edge_bar_dataset(64))
    options = json.loads((result.run_dir / "options.json").read_text())["options"]
    assert options["data_on_device"] is True
    assert all(p.is_cuda for p in result.model.parameters())
    assert math.isfinite(result.final_loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: host syncs matter there")
def test_no_host_sync_between_log_rows_on_cuda(tmp_path):
    counts = []
    for steps in (6, 12):
        cfg = TrainConfig(preset="tiny", timesteps=50, batch_size=8, heldout_size=16, max_steps=steps,
                          log_every=10_000, eval_every=10_000, ckpt_every=10_000, sample_every=10_000,
                          sample_steps=2, device="cuda", out=str(tmp_path / f"runs{steps}"), judge_heldout=0)
        with HostSyncCounter() as counter:
            train(cfg, edge_bar_dataset(512))
        counts.append(len(counter.seen))
    assert counts[0] == counts[1], counts


def test_state_from_a_non_fused_optimizer_resumes_with_the_masked_step():
    """Checkpoints written before the optimizer was fused hold fused=None in their param groups; loading
    one keeps this run's fused AdamW, whose found_inf masks a skipped step."""
    old = _state(seed=1)
    plain = torch.optim.AdamW(old.model.parameters(), lr=1e-2)  # the optimizer older runs saved
    old.model(torch.zeros(2, 1, SIZE, SIZE), torch.zeros(2, dtype=torch.long)).sum().backward()
    plain.step()
    ckpt = {"model": old.model.state_dict(), "ema": old.ema.state_dict(), "optimizer": plain.state_dict(),
            "lr_scheduler": old.lr_scheduler.state_dict(), "scaler": old.scaler.state_dict(),
            "progress": {"step": 1}, "rng": []}
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is None
    state = _state(seed=2)
    assert state.load_state_dict(ckpt, rank=0, world_size=1) is False  # no RNG streams in this file
    assert state.optimizer.param_groups[0]["fused"] is True
    data = edge_bar_dataset(16)
    x0 = data.images[:8].float() / 127.5 - 1
    step = GradientStep(state, state.model, NoiseSchedule("linear", 50), nullcontext(), max_grad_norm=1.0, p_uncond=0.1)
    loss, _, skip = step([(torch.full_like(x0, math.nan), data.labels[:8])])
    assert bool(skip)
    for key, value in old.model.state_dict().items():
        assert torch.equal(state.model.state_dict()[key], value), key
