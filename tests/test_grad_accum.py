"""Gradient accumulation (--grad-accum K): K micro-batches per optimizer step give the loss and gradient
of one K-times larger batch, need no host sync, count optimizer steps and micro-batches right, resume
bit-exactly, and under DDP all-reduce once per optimizer step."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

from shared.diffusion.schedule import NoiseSchedule
from shared.errors import UserError
from shared.model.ema import make_ema
from shared.model.precision import autocast as autocast_for
from shared.model.unet import UNet
from shared.records.checkpoint import LAST_NAME, load_checkpoint
from shared.records.runs import read_log
from shared.training.config import TrainConfig
from shared.training.loop import GradientStep, train
from shared.training.loss import l_simple, min_snr_weight
from shared.training.state import TrainState
from tests.stage3_helpers import (NUM_CLASSES, REPO, SIZE, edge_bar_dataset, one_thread,  # noqa: F401 (autouse)
                                  single_thread_env, write_edge_bar_idx)
from tests.test_ddp import _free_port
from tests.test_training_hot_loop import HostSyncCounter

TIMESTEPS = 50
P_UNCOND = 0.5  # half the labels dropped, so a label draw out of step would show


def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = UNet.from_preset("tiny", image_size=SIZE, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return TrainState(model, make_ema(model, 0.9, 0), optimizer, sched, torch.amp.GradScaler("cpu", enabled=False),
                      torch.Generator().manual_seed(seed + 1), torch.Generator(), torch.device("cpu"))


def replay_draws(generator: torch.Generator, micro_batches, null_class: int) -> tuple:
    """(labels after dropout, t, ε) of the micro-batches, drawn as the training step draws them: per
    micro-batch the label dropout, then t, then ε; concatenated into one batch (on the batches' device)."""
    ys, ts, eps = [], [], []
    for x0, y in micro_batches:
        drop = torch.rand(y.shape[0], device=y.device, generator=generator) < P_UNCOND
        ys.append(y.masked_fill(drop, null_class))
        ts.append(torch.randint(0, TIMESTEPS, (x0.shape[0],), device=x0.device, generator=generator))
        eps.append(torch.randn(x0.shape, device=x0.device, generator=generator))
    return torch.cat(ys), torch.cat(ts), torch.cat(eps)


def _micro_batches(k: int, n: int, seed: int = 0):
    data = edge_bar_dataset(k * n, seed=seed)
    x0 = data.images.float() / 127.5 - 1.0
    return [(x0[i * n:(i + 1) * n], data.labels[i * n:(i + 1) * n]) for i in range(k)]


def _gradients_at_step(state: TrainState) -> dict:
    """Fills a dict with each parameter's gradient as the optimizer is about to use it."""
    seen = {}
    names = {id(p): name for name, p in state.model.named_parameters()}

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            seen.update({names[id(p)]: p.grad.clone() for p in group["params"] if p.grad is not None})
    state.optimizer.register_step_pre_hook(hook)
    return seen


@pytest.mark.parametrize("min_snr_gamma", [0.0, 5.0])
def test_four_micro_batches_of_8_give_the_loss_and_gradient_of_one_batch_of_32(min_snr_gamma):
    """K = 4 × 8 through GradientStep against the mean loss of the 32 images with the same labels,
    t and ε, differentiated in one backward: equal losses and gradients to fp32 rounding."""
    schedule = NoiseSchedule("linear", TIMESTEPS)
    state = _state()
    reference = copy.deepcopy(state.model)
    micro = _micro_batches(4, 8)
    y, t, eps = replay_draws(torch.Generator().set_state(state.train_noise.get_state()), micro,
                             state.model.null_class)
    grads = _gradients_at_step(state)
    loss, _, skip = GradientStep(state, state.model, schedule, nullcontext(), math.inf, P_UNCOND, min_snr_gamma)(micro)
    assert not bool(skip)

    x0 = torch.cat([x for x, _ in micro])
    per_image = l_simple(reference, schedule, x0, y, t, eps)
    if min_snr_gamma > 0:
        per_image = per_image * min_snr_weight(schedule, t, min_snr_gamma)
    ref_loss = per_image.mean()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    ref_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    largest = max(g.abs().max() for g in ref_grads.values())
    for name, ref in ref_grads.items():  # fp32 sums in another order: agree to 1e-6 of the largest entry
        assert (grads[name] - ref).abs().max() <= 1e-6 * largest, name
    # and the step was taken with that gradient: the weights moved
    assert any(not torch.equal(p, r) for p, r in zip(state.model.parameters(), reference.parameters()))


@pytest.mark.parametrize("device,precision", [
    ("cpu", "bf16"),
    pytest.param("cuda", "bf16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    pytest.param("cuda", "fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="needs a CUDA GPU: fp16 autocast with a GradScaler")),
])
def test_accumulated_gradient_under_autocast(device, precision):
    """K = 4 × 8 under bf16 autocast (fp16 with its GradScaler: every micro-loss scaled by one factor,
    unscaled once) against the fp32 gradient of the batch of 32: equal to the low precision's tolerance."""
    schedule = NoiseSchedule("linear", TIMESTEPS)
    state = _state()
    reference = copy.deepcopy(state.model)
    state.model.to(device)
    state.ema.to(device)
    state.optimizer = torch.optim.AdamW(state.model.parameters(), lr=1e-3, fused=True)
    state.scaler = torch.amp.GradScaler(device, init_scale=2.0**10, enabled=precision == "fp16")  # no overflow
    state.train_noise = torch.Generator(device).manual_seed(1)
    micro = _micro_batches(4, 8)
    on_device = [(x.to(device), y.to(device)) for x, y in micro]
    draw_gen = torch.Generator(device).set_state(state.train_noise.get_state())
    y, t, eps = (v.cpu() for v in replay_draws(draw_gen, on_device, state.model.null_class))
    grads = _gradients_at_step(state)
    loss, _, skip = GradientStep(state, state.model, schedule, autocast_for(device, precision), math.inf,
                                 P_UNCOND)(on_device)
    assert not bool(skip)
    ref_loss = l_simple(reference, schedule, torch.cat([x for x, _ in micro]), y, t, eps).mean()
    ref_loss.backward()
    torch.testing.assert_close(loss.cpu(), ref_loss.detach(), rtol=2e-2, atol=0)
    largest = max(p.grad.abs().max() for p in reference.parameters() if p.grad is not None)
    for name, p in reference.named_parameters():
        assert (grads[name].cpu() - p.grad).abs().max() <= 3e-2 * largest, name


def test_micro_batch_draws_are_not_the_large_batch_draws():
    """The reference above is not trivially met: one batch of 32 drawing its own labels, t and ε from the
    same stream gets another loss than the accumulated one."""
    schedule = NoiseSchedule("linear", TIMESTEPS)
    state = _state()
    micro = _micro_batches(4, 8)
    generator = torch.Generator().set_state(state.train_noise.get_state())
    whole = [(torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))]
    y, t, eps = replay_draws(generator, whole, state.model.null_class)
    with torch.no_grad():
        other = l_simple(copy.deepcopy(state.model), schedule, whole[0][0], y, t, eps).mean()
    loss, _, _ = GradientStep(state, state.model, schedule, nullcontext(), math.inf, P_UNCOND)(micro)
    assert abs(float(loss) - float(other)) > 1e-4


def _cfg(tmp_path, name: str, **overrides) -> TrainConfig:
    base = dict(preset="tiny", timesteps=TIMESTEPS, batch_size=4, heldout_size=8, judge_heldout=0, log_every=1,
                eval_every=10_000, ckpt_every=10_000, sample_every=10_000, sample_steps=2, device="cpu",
                precision="fp32", out=str(tmp_path / name), seed=5, grad_accum=3)
    return TrainConfig(**{**base, **overrides})


def test_epochs_count_optimizer_steps_and_throughput_counts_micro_batches(tmp_path):
    """52 training images = 13 micro-batches of 4 = 4 optimizer steps of K = 3 per epoch (the 13th is
    dropped); 2 epochs are 8 steps of 12 images each, ending after micro-batch 12 of epoch 1."""
    result = train(_cfg(tmp_path, "runs", epochs=2), edge_bar_dataset(60))
    assert result.progress.step == 8 and result.progress.epoch == 1 and result.progress.batch_in_epoch == 12
    assert result.progress.images_seen == 8 * 3 * 4
    assert result.epochs_done == 2.0
    ckpt = load_checkpoint(result.run_dir / LAST_NAME)
    assert ckpt["options"]["steps_per_epoch"] == 4 and ckpt["options"]["grad_accum"] == 3
    assert [int(r["step"]) for r in read_log(result.run_dir / "log.csv")] == list(range(1, 9))


def test_grad_accum_above_the_micro_batches_of_an_epoch_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"--grad-accum 14 exceeds the 13 micro-batches of --batch-size 4"):
        train(_cfg(tmp_path, "runs", grad_accum=14, max_steps=2), edge_bar_dataset(60))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_no_host_sync_per_accumulated_step(tmp_path):
    """With K = 3, a run of 12 steps makes the host syncs of a run of 6 (the bookkeeping at the end)."""
    counts = []
    for steps in (6, 12):
        cfg = _cfg(tmp_path, f"runs{steps}", max_steps=steps, log_every=10_000)
        with HostSyncCounter() as counter:
            train(cfg, edge_bar_dataset(200))
        counts.append(len(counter.seen))
    assert counts[0] > 0 and counts[0] == counts[1], counts


def test_resume_mid_run_matches_the_uninterrupted_run_bitwise(tmp_path):
    """K = 3: a run stopped after step 6 (mid-epoch 1: micro-batch 6 of 13) and resumed to step 10 ends
    with the weights, EMA, optimizer state and log rows of a run of 10 steps, bit for bit."""
    data = edge_bar_dataset(60)
    full = train(_cfg(tmp_path, "full", max_steps=10), data)
    first = train(_cfg(tmp_path, "part", max_steps=6), data)
    assert first.progress.epoch == 1 and first.progress.batch_in_epoch == 6
    resumed = train(TrainConfig(resume=str(first.run_dir), max_steps=10, out=str(tmp_path / "part"), device="cpu"),
                    data)
    a, b = load_checkpoint(full.run_dir / LAST_NAME), load_checkpoint(resumed.run_dir / LAST_NAME)
    assert a["progress"] == b["progress"] and a["progress"]["step"] == 10
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(b["optimizer"]["state"][i][key], value), (i, key)
    rows = lambda run: [(r["step"], r["loss"], r["grad_norm"]) for r in read_log(run / "log.csv")]  # noqa: E731
    assert rows(resumed.run_dir) == rows(full.run_dir)


def test_resume_refuses_another_grad_accum(tmp_path):
    first = train(_cfg(tmp_path, "runs", max_steps=2), edge_bar_dataset(60))
    with pytest.raises(UserError, match="--grad-accum 2 does not match"):
        train(TrainConfig(resume=str(first.run_dir), grad_accum=2, max_steps=4, out=str(tmp_path / "runs"),
                          device="cpu"), edge_bar_dataset(60), given={"resume", "grad_accum", "max_steps", "out"})


# --------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes

DDP_STEPS, DDP_K, DDP_N = 2, 2, 4


def rank_micro_batches(step: int, rank: int):
    """The K micro-batches of N images that `rank` trains on at optimizer step `step`."""
    return _micro_batches(DDP_K, DDP_N, seed=100 * step + rank)


def rank_noise(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000 + rank)


# Each rank: (a) GradientStep on a DDP model with a counting all-reduce hook, (b) train() with
# --grad-accum 2, its DistributedDataParallel counting the same way. Both record, per all-reduce, how many
# forwards the model had run by then.
DDP_WORKER = """
import math, os, sys, torch
from contextlib import nullcontext
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from shared.diffusion.schedule import NoiseSchedule
from shared.training import distributed, loop
from shared.training.config import TrainConfig
from tests.test_grad_accum import DDP_STEPS, P_UNCOND, TIMESTEPS, _state, rank_micro_batches, rank_noise

class Counting(DistributedDataParallel):
    made = []
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards, self.synced_at = 0, []
        self.register_comm_hook(None, self._hook)
        Counting.made.append(self)
    def forward(self, *args, **kwargs):
        self.forwards += 1
        return super().forward(*args, **kwargs)
    def _hook(self, group, bucket):
        self.synced_at.append(self.forwards)
        return allreduce_hook(group, bucket)

data, out, dump = sys.argv[1:4]
ctx, device = distributed.setup("cpu")
state = _state(seed=0)
state.train_noise = rank_noise(ctx.rank)
ddp = Counting(state.model)
schedule = NoiseSchedule("linear", TIMESTEPS)
for step in range(DDP_STEPS):
    gradient_step = loop.GradientStep(state, ddp, schedule, nullcontext(), math.inf, P_UNCOND, ctx=ctx)
    gradient_step(rank_micro_batches(step, ctx.rank))
direct = {"model": state.model.state_dict(), "synced_at": ddp.synced_at, "forwards": ddp.forwards}
print("direct done", file=sys.stderr, flush=True)

loop.DistributedDataParallel = Counting
cfg = TrainConfig(dataset="mnist", data_dir=data, out=out, preset="tiny", timesteps=50, batch_size=4, grad_accum=2,
                  heldout_size=16, judge_heldout=0, max_steps=3, log_every=2, eval_every=2, ckpt_every=2,
                  sample_every=1000, sample_steps=2, device="cpu", precision="fp32", seed=3)
result = loop.train(cfg)
run = Counting.made[-1]
torch.save({"direct": direct, "train": {"model": result.model.state_dict(), "synced_at": run.synced_at,
            "forwards": run.forwards, "step": result.progress.step}},
           os.path.join(dump, f"rank{ctx.rank}.pt"))
"""


def test_ddp_all_reduces_once_per_optimizer_step_and_matches_one_process(tmp_path):
    """2 gloo processes, K = 2 micro-batches of 4 per rank: every all-reduce comes after the K-th forward
    (none on the inner micro-step), and the weights equal one process training on all 16 images of
    each step with the same labels, t and ε; train() under DDP does the same and both ranks agree."""
    data = write_edge_bar_idx(tmp_path / "data", n=96)
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    out, dump = tmp_path / "runs", tmp_path / "dump"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker), str(data), str(out), str(dump)]
    proc = subprocess.run(cmd, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for record in (ranks[0]["direct"], ranks[0]["train"], ranks[1]["train"]):
        steps = record["forwards"] // DDP_K
        assert record["forwards"] == steps * DDP_K and steps >= DDP_STEPS
        assert record["synced_at"], "no all-reduce seen"
        # each all-reduce (one per gradient bucket) follows the last micro-batch of a step, every step has them
        assert all(f % DDP_K == 0 for f in record["synced_at"]), record["synced_at"]
        assert sorted(set(record["synced_at"])) == [DDP_K * (s + 1) for s in range(steps)]
    assert ranks[0]["train"]["step"] == 3 and ranks[0]["train"]["forwards"] == 3 * DDP_K
    for key, value in ranks[0]["train"]["model"].items():
        assert torch.equal(ranks[1]["train"]["model"][key], value), key

    reference = _state(seed=0)
    initial = copy.deepcopy(reference.model.state_dict())
    schedule, noise = NoiseSchedule("linear", TIMESTEPS), [rank_noise(r) for r in range(2)]
    for step in range(DDP_STEPS):
        micro = [rank_micro_batches(step, r) for r in range(2)]
        draws = [replay_draws(noise[r], micro[r], reference.model.null_class) for r in range(2)]
        x0 = torch.cat([x for r in range(2) for x, _ in micro[r]])
        y, t, eps = (torch.cat(parts) for parts in zip(*draws))
        l_simple(reference.model, schedule, x0, y, t, eps).mean().backward()
        reference.optimizer.step()
        reference.optimizer.zero_grad(set_to_none=True)
    for key, value in reference.model.state_dict().items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["direct"]["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(initial[k], v) for k, v in reference.model.state_dict().items())
