"""Training a DDPM noise predictor ε_θ with L_simple (Ho et al. 2020, Algorithm 1 and Eq. 14).

    repeat
        x0 ~ data,  t ~ Uniform{0, …, T−1},  ε ~ N(0, I)
        x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε                                  (q_sample, Eq. 4)
        take a gradient step on  L_simple = ‖ε − ε_θ(x_t, t[, y])‖²  (mean over pixels and batch)

Around that loop, the practices that make it converge and survive: AdamW with linear warm-up and an
optional cosine decay, gradient clipping, an EMA of the weights (used for every evaluation and sample),
bf16/fp16 autocast (fp16 with a GradScaler), skipping of non-finite steps, label dropout to the null
class for classifier-free guidance (Ho & Salimans 2022), a held-out denoising loss with fixed t and ε
so evaluations compare, early stopping on it, exact resume, DistributedDataParallel and gradient
accumulation (one optimizer step over K micro-batches: the gradient of a K-times larger batch).

The step never waits on the host: the loss, the gradient norm and the finite check stay on the device;
a non-finite step is masked out of the optimizer (fused AdamW's found_inf) and the EMA (a zero weight)
by a device flag, and the values are read only when a log row is written.

The parts: config.py (options), loss.py (L_simple), batches.py (data order), state.py (what a checkpoint
holds), recorder.py (logs, grids, checkpoints), heldout.py (the held-out loss). `train(cfg)` is the job.
"""
from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from shared.diffusion.noise import seed_everything
from shared.diffusion.schedule import NoiseSchedule
from shared.errors import UserError
from shared.model.ema import make_ema
from shared.model.precision import autocast as autocast_for
from shared.model.unet import UNet
from shared.records.checkpoint import (BEST_NAME, LAST_NAME, TRAIN_FORMAT, check_same_model, load_checkpoint,
                                       resolve_checkpoint)
from shared.records.runs import check_not_run_dir, check_writable_dir
from shared.training import distributed
from shared.training.batches import Batches
from shared.training.config import TrainConfig, check_config, merge_resume_options, resolve_precision, resolved_length
from shared.data.datasets import load_training_dataset, without_judge_heldout
from shared.training.heldout import fixed_heldout_batch, heldout_loss, split_heldout
from shared.training.loss import drop_labels, l_simple, min_snr_weight
from shared.training.recorder import Due, Recorder, Window, agree, check_tensorboard, due_at
from shared.training.signals import Interrupted, StopSignals
from shared.training.state import Progress, TrainState

RANK_SEED_STRIDE = 7_919                # per-rank seeds: seed + rank·stride (a prime, so ranks never collide)


@dataclass
class TrainResult:
    run_dir: Path | None
    progress: Progress
    images_per_s: float
    final_loss: float
    stopped_early: bool
    epochs_done: float              # epochs trained, counting a part-finished one as a fraction
    model: torch.nn.Module          # the plain (unwrapped) trained network
    ema: torch.nn.Module            # the EMA network


# --------------------------------------------------------------------------------------------------
# One step of Algorithm 1

def masked_optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() that changes nothing (weights, moments, step count) where the 0-dim bool device
    tensor `skip` is true, without reading it on the host: fused AdamW honours `found_inf` in-kernel."""
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def micro_batch_loss(state: TrainState, model, schedule: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor,
                     autocast, p_uncond: float, min_snr_gamma: float) -> torch.Tensor:
    """L_simple (or its min-SNR-γ weighting) averaged over x0 [N x C x H x W], y [N]: a 0-dim device tensor.

    The label dropout, t and ε are drawn from state.train_noise in that order, once per call."""
    raw = state.model
    y = drop_labels(y, p_uncond, raw.null_class, state.train_noise) if raw.num_classes else None
    # t drawn here, first, as l_simple would draw it: the same stream, and the weights need it
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=state.train_noise)
    per_image = l_simple(model, schedule, x0, y, t, generator=state.train_noise, autocast=autocast)
    if min_snr_gamma > 0:
        per_image = per_image * min_snr_weight(schedule, t, min_snr_gamma)
    return per_image.mean()


def accumulation_step(state: TrainState, model, schedule: NoiseSchedule, micro_batches, autocast,
                      max_grad_norm: float, p_uncond: float, ctx, min_snr_gamma: float = 0.0) -> tuple:
    """One optimizer step on K micro-batches [(x0 [N x C x H x W], y [N]), …] of equal N. No host sync.

    Each micro-loss is scaled by 1/K before its backward, so the summed gradient is that of the mean
    L_simple over all K·N images: one K-times larger batch. Under DDP the first K−1 backwards run in
    no_sync (gradients accumulate locally) and the last one all-reduces the sum once. fp16's GradScaler
    scales every micro-loss by the same factor and is unscaled once, before clipping.

    Returns device tensors (loss averaged over micro-batches and ranks, gradient norm before clipping,
    skipped flag).
    """
    k = len(micro_batches)
    loss_sum = None
    for i, (x0, y) in enumerate(micro_batches):
        with distributed.no_sync(model) if i < k - 1 else nullcontext():
            loss = micro_batch_loss(state, model, schedule, x0, y, autocast, p_uncond, min_snr_gamma) / k
            state.scaler.scale(loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    loss_avg = distributed.mean_across_ranks(loss_sum, ctx)  # every rank decides on the same value
    state.scaler.unscale_(state.optimizer)  # clip the true gradient, not the loss-scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_grad_norm)
    skip = ~(torch.isfinite(loss_avg) & torch.isfinite(grad_norm))
    masked_optimizer_step(state.optimizer, skip)
    state.scaler.update()  # fp16: an overflow halves the loss scale for the next step
    state.ema.update_parameters(state.model, skip=skip)
    state.optimizer.zero_grad(set_to_none=True)
    state.count_step(skip)
    return loss_avg, grad_norm, skip


def training_step(state: TrainState, model, schedule: NoiseSchedule, x0: torch.Tensor, y: torch.Tensor,
                  autocast, max_grad_norm: float, p_uncond: float, ctx, min_snr_gamma: float = 0.0) -> tuple:
    """One iteration of Algorithm 1 on x0 [N x C x H x W], y [N] (both on the device): accumulation_step
    with one micro-batch. min_snr_gamma: 0 trains on L_simple; γ > 0 weights each image's L_simple by
    min(1, γ/SNR_t)."""
    return accumulation_step(state, model, schedule, [(x0, y)], autocast, max_grad_norm, p_uncond, ctx,
                             min_snr_gamma)


# --------------------------------------------------------------------------------------------------
# Set-up

def lr_factor(step: int, warmup_steps: int, total_steps: int, cosine: bool) -> float:
    """Multiplier of the base LR at `step`: linear warm-up to 1, then 1 or a cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_model(cfg: TrainConfig, image_shape: tuple, num_classes: int) -> UNet:
    """The preset U-Net, sized to the data (channels, image size) and to the classes when class-cond."""
    channels, height, width = image_shape
    if height != width:
        raise UserError(f"the U-Net takes square images; the data is {height}×{width}")
    try:
        return UNet.from_preset(cfg.preset, in_channels=channels, image_size=height,
                                num_classes=num_classes if cfg.class_cond else 0)
    except ValueError as err:
        raise UserError(f"preset {cfg.preset!r} cannot take {channels}×{height}×{width} images: {err}") from None


def _resume_point(cfg: TrainConfig, given: set[str] | None):
    """(options, checkpoint dict or None, its path or None): a resumed run's options come from its file."""
    if cfg.resume is None:
        return cfg, None, None
    path = resolve_checkpoint(cfg.resume, prefer=(LAST_NAME,))
    ckpt = load_checkpoint(path)
    if ckpt["format"] != TRAIN_FORMAT:
        raise UserError(f"{str(path)!r} holds EMA weights only and cannot resume training; "
                        f"use the run's {LAST_NAME} or {BEST_NAME}")
    return merge_resume_options(cfg, ckpt.get("options", {}), str(path), given), ckpt, path


def _data(cfg: TrainConfig, dataset, ctx, device):
    """(dataset info, Batches, held-out images or None, evaluator images left out)."""
    if dataset is None:
        dataset = load_training_dataset(cfg, quiet=not ctx.is_main)
    if len(dataset) == 0:
        raise UserError(f"the dataset {cfg.dataset!r} holds no images")
    if cfg.class_cond and dataset.info.num_classes < 1:
        raise UserError(f"class-conditional training needs labelled data; {cfg.dataset!r} has no classes "
                        f"(use --no-class-cond)")
    dataset, excluded = without_judge_heldout(dataset, cfg.judge_heldout)
    train_set, heldout_set = split_heldout(dataset, cfg.heldout_size, cfg.seed)
    batches = Batches(train_set, cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed, device,
                      cfg.num_workers, cfg.channels_last, random_flip=cfg.random_flip)
    if batches.steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {batches.sampler.num_samples} training images "
                        f"per process")
    if batches.steps_per_epoch < cfg.grad_accum:
        raise UserError(f"--grad-accum {cfg.grad_accum} exceeds the {batches.steps_per_epoch} micro-batches of "
                        f"--batch-size {cfg.batch_size} in an epoch per process")
    return dataset.info, batches, heldout_set, excluded


def _build_state(cfg: TrainConfig, info, device, ctx, total_steps: int, loader_gen) -> TrainState:
    """Model, EMA, optimizer, LR schedule, scaler: identical initial weights on every rank."""
    seed_everything(cfg.seed)
    raw_model = build_model(cfg, tuple(info.image_shape), info.num_classes).to(device)
    if cfg.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    if cfg.fused_kernels:
        raw_model.set_fused_kernels(True)  # raises kernels.FusedKernelsUnavailable; never falls back
    ema = make_ema(raw_model, cfg.ema_decay, cfg.ema_warmup)
    # fused: one kernel per step on CPU and CUDA, and its found_inf masks a skipped step on the device
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.cosine))
    precision = cfg.precision
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    seed_everything(cfg.seed + RANK_SEED_STRIDE * ctx.rank)  # then per-rank streams
    train_noise = torch.Generator(device).manual_seed(cfg.seed + RANK_SEED_STRIDE * ctx.rank)
    return TrainState(raw_model, ema, optimizer, lr_sched, scaler, train_noise, loader_gen, device)


def _probe_fused(raw_model, info, device, autocast) -> None:
    """A fused kernel that cannot run here fails now, before any record is written."""
    raw_model.eval()  # (eval: no dropout, so the probe draws nothing from the RNG)
    with torch.no_grad(), autocast:
        raw_model(torch.zeros(1, *info.image_shape, device=device), torch.zeros(1, dtype=torch.long, device=device))
    raw_model.train()


# --------------------------------------------------------------------------------------------------
# The job

def train(cfg: TrainConfig, dataset=None, given: set[str] | None = None, note: str | None = None) -> TrainResult:
    """Runs (or resumes) one training job; returns counters, throughput and the trained networks.

    dataset: a dataset yielding (image [C x H x W] in [-1, 1], label) with an `.info`
    (shared.data.datasets.DatasetInfo); None loads cfg.dataset from cfg.data_dir.
    given: with cfg.resume, the options set explicitly (see merge_resume_options).
    note: one line printed (stderr, rank 0) once the run directory exists, e.g. the CPU recipe note.
    Raises UserError for bad input and for a run stopped by non-finite steps; signals.Interrupted
    after SIGINT/SIGTERM (last.pt written).
    """
    check_config(cfg)
    ctx, device = distributed.setup(cfg.device)
    try:
        with StopSignals() as signals:
            return _train(cfg, dataset, given, note, ctx, device, signals)
    finally:
        distributed.cleanup(ctx)


def _train(cfg: TrainConfig, dataset, given, note, ctx, device, signals) -> TrainResult:
    cfg, ckpt, ckpt_path = _resume_point(cfg, given)
    precision = resolve_precision(cfg.precision, device)
    if cfg.tensorboard:
        check_tensorboard()
    if ctx.is_main:  # fail before any slow work
        check_not_run_dir(cfg.out)
        check_writable_dir(cfg.out)
    info, batches, heldout_set, excluded = _data(cfg, dataset, ctx, device)
    steps_per_epoch = batches.steps_per_epoch // cfg.grad_accum  # optimizer steps; a last partial group is dropped
    total_steps = resolved_length(cfg, steps_per_epoch)
    schedule = NoiseSchedule(cfg.schedule, cfg.timesteps)
    state = _build_state(TrainConfig(**{**asdict(cfg), "precision": precision}), info, device, ctx, total_steps,
                         batches.loader_gen)
    if ckpt is not None:
        check_same_model(ckpt, state.model.config, cfg.preset, ckpt_path)
        if not state.load_state_dict(ckpt, ctx.rank, ctx.world_size) and ctx.is_main:
            print(f"warning: checkpoint was written by {len(ckpt['rng'])} process(es), this run has "
                  f"{ctx.world_size}; random streams restart from the seed, so the run is not bit-exact")
    model = state.model
    if ctx.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    autocast = autocast_for(device, precision)
    heldout = fixed_heldout_batch(heldout_set, cfg.timesteps, cfg.seed, device) if heldout_set else None
    if cfg.fused_kernels:
        _probe_fused(state.model, info, device, autocast)

    options = {**asdict(cfg), "precision": precision, "resolved_max_steps": total_steps,
               "steps_per_epoch": steps_per_epoch, "world_size": ctx.world_size,
               "judge_heldout_excluded": excluded, "data_on_device": batches.on_device}
    meta = {"dataset": cfg.dataset, "preset": cfg.preset, "num_classes": state.model.num_classes,
            "image_shape": list(info.image_shape), "schedule": schedule.to_dict(), "options": options}
    extra = {"dataset": info.to_dict(), "world_size": ctx.world_size,
             "model_parameters": sum(p.numel() for p in state.model.parameters()),
             "resumed_from": str(ckpt_path) if ckpt_path else None}
    recorder = Recorder(ctx, cfg, options, meta, extra, device, ckpt_path, state.progress.step)
    if note and ctx.is_main:
        print(note, file=sys.stderr)
    try:
        return _loop(cfg, ctx, device, state, model, schedule, batches, heldout, recorder, autocast, precision,
                     total_steps, signals)
    finally:
        recorder.close()


def _loop(cfg, ctx, device, state: TrainState, model, schedule, batches: Batches, heldout, recorder: Recorder,
          autocast, precision, total_steps, signals) -> TrainResult:
    progress, window = state.progress, Window(device)
    bar = tqdm(total=total_steps, initial=progress.step, disable=not ctx.is_main, unit="step",
               dynamic_ncols=True, desc="train")
    max_grad_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, clip nothing
    k = cfg.grad_accum
    micro_per_epoch = batches.steps_per_epoch // k * k  # the micro-batches of whole optimizer steps
    images_per_step = cfg.batch_size * ctx.world_size * k
    totals = {"time": 0.0, "images": 0, "last_loss": math.nan}
    stop, stopped_early, steps_here = None, False, 0
    while progress.step < total_steps and stop is None:
        for micro_batches in _groups(batches, progress.epoch, progress.batch_in_epoch, micro_per_epoch, k):
            lr_now = state.lr_scheduler.get_last_lr()[0]
            loss, grad_norm, skip = accumulation_step(state, model, schedule, micro_batches, autocast, max_grad_norm,
                                                      cfg.p_uncond, ctx, cfg.min_snr_gamma)
            state.lr_scheduler.step()
            progress.step += 1
            progress.batch_in_epoch += k
            progress.images_seen += images_per_step
            window.add(loss, grad_norm, ~skip, images_per_step)
            steps_here += 1
            if steps_here == 1:  # throughput leaves out the first step (torch.compile, allocator warm-up)
                window.start_clock()
            final = progress.step >= total_steps
            if signals.received is not None and not ctx.enabled:
                stop = "interrupted"
            stop, stopped_early = _bookkeeping(cfg, ctx, device, state, schedule, heldout, recorder, window,
                                               due_at(progress.step, cfg, final), final, stop, stopped_early,
                                               lr_now, autocast, precision, bar, totals, signals)
            if window.clock is None:  # a row was written: time the next steps, not the bookkeeping
                window.start_clock()
            if final or stop:
                break
        else:  # the epoch ran out: the next one starts from its first batch
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    if stop == "interrupted":
        name = StopSignals.name(signals.received)
        where = f"last.pt at step {recorder.saved_step}" if recorder.saved_step is not None else "no checkpoint"
        raise Interrupted(signals.received, f"{name}: stopped after step {progress.step}; {where}"
                          + (f" in {recorder.run_dir}" if recorder.run_dir else "")
                          + (" (resume with --resume)" if recorder.saved_step is not None else ""))
    distributed.barrier(ctx)
    images_per_s = totals["images"] / totals["time"] if totals["time"] > 0 else math.nan
    return TrainResult(recorder.run_dir, progress, images_per_s, totals["last_loss"], stopped_early,
                       progress.epoch + progress.batch_in_epoch / micro_per_epoch, state.model,
                       state.ema.module)


def _groups(batches: Batches, epoch: int, start: int, micro_per_epoch: int, k: int):
    """The rest of `epoch` from micro-batch `start` on, as lists of k micro-batches (one optimizer step
    each); the micro-batches after the last whole group are not drawn."""
    micro = islice(batches.epoch(epoch, start), micro_per_epoch - start)
    while group := list(islice(micro, k)):
        yield group


def _bookkeeping(cfg, ctx, device, state: TrainState, schedule, heldout, recorder: Recorder, window: Window,
                 due: Due, final: bool, stop, stopped_early: bool, lr_now: float, autocast, precision, bar,
                 totals: dict, signals):
    """Evaluation, the log row, the stop checks, checkpoints, grids and plots due after this step.

    Returns (stop reason or None, stopped early). The only host reads of the step's values are here."""
    progress = state.progress
    heldout_value, improved = None, False
    if due.evaluate:
        if heldout is not None and ctx.is_main:
            heldout_value = heldout_loss(state.ema.module, schedule, heldout, state.model.num_classes > 0,
                                         cfg.batch_size, autocast)
            improved = heldout_value < progress.best_heldout
            if improved:
                progress.best_heldout, progress.evals_since_best = heldout_value, 0
            else:
                progress.evals_since_best += 1
        improved = agree(improved, ctx, device)  # best.pt saving is collective
        if agree(cfg.early_stop_patience > 0 and progress.evals_since_best >= cfg.early_stop_patience, ctx, device):
            stop, stopped_early = stop or "early", True
    if due.log or (due.evaluate and heldout is not None) or stop:  # the same on every rank (collectives inside)
        if ctx.enabled and distributed.any_rank(signals.received is not None, ctx, device):
            stop = stop or "interrupted"
        row = window.read()
        state.sync_progress()
        if row["loss"] is not None:
            totals["last_loss"] = row["loss"]
        totals["time"], totals["images"] = totals["time"] + row["time"], totals["images"] + row["images"]
        recorder.write_row({"step": progress.step, "epoch": progress.epoch, "loss": row["loss"],
                            "heldout_loss": heldout_value, "lr": lr_now, "images_per_s": row["images_per_s"],
                            "grad_norm": row["grad_norm"], "skipped": progress.skipped_total})
        bar.set_postfix(loss=f"{row['loss'] or math.nan:.4f}", img_s=f"{row['images_per_s'] or 0:.0f}",
                        refresh=False)
        if progress.consecutive_skips >= cfg.max_consecutive_skips:
            bar.close()
            raise UserError(f"stopping: {progress.consecutive_skips} consecutive steps had a non-finite loss or "
                            f"gradient (step {progress.step}); {recorder.where_saved()}")
    if ctx.is_main:
        bar.update(1)
    if improved:
        recorder.checkpoint(state, schedule, BEST_NAME)
    if due.checkpoint or stop:
        recorder.checkpoint(state, schedule, LAST_NAME, in_skip_run_ok=final or stop == "early")
    if ctx.is_main and (due.samples or stop == "early"):  # an interrupted run exits without a grid
        recorder.samples(state.ema.module, schedule, progress.step, precision)
    if ctx.is_main:
        recorder.plot(force=final or bool(stop))
    return stop, stopped_early

