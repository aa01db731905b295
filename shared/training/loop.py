"""Training a DDPM noise predictor ε_θ with L_simple (Ho et al. 2020, Algorithm 1 and Eq. 14).

    repeat
        x0 ~ data,  t ~ Uniform{0, …, T−1},  ε ~ N(0, I)
        x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε                                  (q_sample, Eq. 4)
        take a gradient step on  L_simple = ‖ε − ε_θ(x_t, t[, y])‖²  (mean over pixels and batch)

Around that loop, the practices that make it converge and survive: AdamW with linear warm-up and an
optional cosine decay, gradient clipping, an EMA of the weights (used for every evaluation and sample),
bf16/fp16 autocast (fp16 with a GradScaler), skipping of non-finite steps, label dropout to the null
class for classifier-free guidance (Ho & Salimans 2022), a held-out denoising loss with fixed t and ε
so evaluations compare, early stopping on it, exact resume and DistributedDataParallel.

`train(cfg)` is the whole job; stage3_train/train.py only parses flags into a TrainConfig.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from shared.training import distributed
from shared.records.checkpoint import (BEST_NAME, EMA_NAME, LAST_NAME, TRAIN_FORMAT, atomic_save, check_same_model,
                               ema_file, load_checkpoint, resolve_checkpoint)
from shared.diffusion.forward import q_sample
from shared.model.precision import TRAIN_PRECISIONS, autocast as autocast_for, check_precision
from shared.model.ema import DEFAULT_EMA_DECAY, DEFAULT_EMA_WARMUP, make_ema
from shared.errors import UserError
from shared.records.runs import CsvLog, check_writable_dir, make_run_dir, plot_loss, read_log, write_options
from shared.diffusion.schedule import NoiseSchedule
from shared.diffusion.noise import seed_everything
from shared.training.state import Progress, ResumableSampler, capture_rng, restore_rng
from shared.model.unet import UNet

DEFAULT_MAX_STEPS = 6000        # with batch 128: ~1.1 epochs of 60k MNIST, recognisable digits with EMA
SAMPLE_GRID_ROWS = 8            # sample grids have 8 rows (and 8 columns, or one per class)
MAX_GRID_CLASSES = 16
HELDOUT_NOISE_SEED_OFFSET = 1_000_003   # held-out t and ε come from their own stream, never the training one
SAMPLE_SEED_OFFSET = 2_000_003          # grid image i uses seed + offset + i, the same at every grid
PLOT_INTERVAL_S = 30.0          # loss.png is redrawn at most this often (matplotlib is slow) and at the end
RANK_SEED_STRIDE = 7_919                # per-rank seeds: seed + rank·stride (a prime, so ranks never collide)


@dataclass
class TrainConfig:
    """Every option of a training run; stage3_train/train.py exposes each as a flag of the same name."""
    dataset: str = "mnist"
    data_dir: str | None = None
    preset: str = "mnist"
    schedule: str = "linear"
    timesteps: int = 1000
    seed: int = 0
    out: str = "runs"
    epochs: int | None = None
    max_steps: int | None = None        # None and no --epochs: DEFAULT_MAX_STEPS
    batch_size: int = 128               # per process
    num_workers: int = 0
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    cosine: bool = False
    grad_clip: float = 1.0              # 0 disables clipping
    ema_decay: float = DEFAULT_EMA_DECAY
    ema_warmup: int = DEFAULT_EMA_WARMUP
    precision: str = "auto"             # bf16 on a CUDA GPU that supports it, else fp32
    class_cond: bool = False
    p_uncond: float = 0.1
    max_consecutive_skips: int = 20
    log_every: int = 10
    sample_every: int = 1000
    sample_steps: int = 50
    ckpt_every: int = 1000
    eval_every: int = 500
    heldout_size: int = 256
    early_stop_patience: int = 0        # evaluations without improvement before stopping; 0 = never
    fused_kernels: bool = False
    compile: bool = False
    channels_last: bool = False
    device: str = "auto"
    resume: str | None = None


# Options a resumed run must share with its checkpoint (they define the model, the data or its order).
# (precision may change: a run started on one machine can continue on another.)
FIXED_ON_RESUME = ("dataset", "preset", "schedule", "timesteps", "seed", "batch_size", "class_cond",
                   "heldout_size")
# Options never taken from a checkpoint.
NOT_INHERITED = ("resume", "device")


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
# Options

def resolve_precision(precision: str, device: torch.device) -> str:
    check_precision(precision, TRAIN_PRECISIONS)
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (CPU autocast has no fp16 loss scaling); "
                        "use bf16 or fp32 on the CPU")
    return precision


def merge_resume_options(cfg: TrainConfig, saved: dict, path: str,
                         given: set[str] | None = None) -> TrainConfig:
    """Options for a resumed run: those not given come from the checkpoint; one given on the command
    line must agree with it if it is in FIXED_ON_RESUME (the error names the mismatch).

    given: the option names the user set explicitly; None treats every non-default value as given.
    """
    defaults, merged = asdict(TrainConfig()), asdict(cfg)
    for key, saved_value in saved.items():
        if key not in merged or key in NOT_INHERITED:
            continue
        is_given = key in given if given is not None else merged[key] != defaults[key]
        if not is_given:
            merged[key] = saved_value
        elif key in FIXED_ON_RESUME and merged[key] != saved_value:
            raise UserError(f"--{key.replace('_', '-')} {merged[key]} does not match the checkpoint "
                            f"{path!r}, which was trained with {saved_value}")
    return TrainConfig(**merged)


def check_config(cfg: TrainConfig) -> None:
    """Range checks for library callers (the CLI's typed flags already enforce these)."""
    positive = ("timesteps", "batch_size", "log_every", "sample_every", "sample_steps", "ckpt_every",
                "eval_every", "max_consecutive_skips")
    for name in positive:
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise UserError(f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    for name in ("epochs", "max_steps"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    if cfg.epochs is not None and cfg.max_steps is not None:
        raise UserError("give --epochs or --max-steps, not both")
    if not 0.0 <= cfg.p_uncond <= 1.0:
        raise UserError(f"p_uncond must lie in [0, 1], got {cfg.p_uncond}")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise UserError(f"ema_decay must lie in [0, 1], got {cfg.ema_decay}")
    if not cfg.lr > 0 or cfg.grad_clip < 0 or cfg.weight_decay < 0:
        raise UserError("need lr > 0, grad_clip >= 0 and weight_decay >= 0")
    if cfg.early_stop_patience > 0 and cfg.heldout_size == 0:
        raise UserError("--early-stop-patience needs a held-out set (--heldout-size > 0)")
    if cfg.sample_steps > cfg.timesteps:
        raise UserError(f"--sample-steps {cfg.sample_steps} exceeds --timesteps {cfg.timesteps}")


# --------------------------------------------------------------------------------------------------
# Pieces of the loop

def lr_factor(step: int, warmup_steps: int, total_steps: int, cosine: bool) -> float:
    """Multiplier of the base LR at `step`: linear warm-up to 1, then 1 or a cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def split_heldout(dataset: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part of `size` images), chosen by a permutation fixed by `seed`."""
    n = len(dataset)
    if size == 0:
        return dataset, None
    if size >= n:
        raise UserError(f"--heldout-size {size} leaves no training images (the dataset has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[size:]), Subset(dataset, order[:size])


def fixed_heldout_batch(heldout: Dataset, num_timesteps: int, seed: int, device: torch.device):
    """The held-out images with their t and ε drawn once, so every evaluation sees the same problem."""
    items = [heldout[i] for i in range(len(heldout))]  # each image read (and decoded) once
    x0 = torch.stack([image for image, _ in items])
    y = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed + HELDOUT_NOISE_SEED_OFFSET)
    t = torch.randint(0, num_timesteps, (len(heldout),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0.to(device), y.to(device), t.to(device), noise.to(device)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, schedule: NoiseSchedule, batch, class_cond: bool, batch_size: int,
                 autocast) -> float:
    """L_simple of `model` (in eval mode) on the fixed held-out (x0, y, t, ε), averaged over images."""
    x0, y, t, noise = batch
    total = 0.0
    for s in range(0, x0.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        x_t = q_sample(schedule, x0[sl], t[sl], noise[sl])
        with autocast:
            eps_pred = model(x_t, t[sl], y[sl] if class_cond else None)
        total += F.mse_loss(eps_pred.float(), noise[sl], reduction="sum").item() / noise[0].numel()
    return total / x0.shape[0]


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


# --------------------------------------------------------------------------------------------------
# The job

def train(cfg: TrainConfig, dataset: Dataset | None = None, given: set[str] | None = None) -> TrainResult:
    """Runs (or resumes) one training job; returns counters, throughput and the trained networks.

    dataset: an in-memory dataset yielding (image [C x H x W] in [-1, 1], label) with an `.info`
    (shared.training.data.DatasetInfo); None loads cfg.dataset from cfg.data_dir.
    given: with cfg.resume, the options set explicitly (see merge_resume_options).
    """
    check_config(cfg)
    ctx, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, dataset, given, ctx, device)
    finally:
        distributed.cleanup(ctx)


def _train(cfg: TrainConfig, dataset, given, ctx, device) -> TrainResult:
    # ---- resume: the checkpoint's options fill in what the command line left at default
    ckpt, ckpt_path = None, None
    if cfg.resume is not None:
        ckpt_path = resolve_checkpoint(cfg.resume, prefer=(LAST_NAME,))
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["format"] != TRAIN_FORMAT:
            raise UserError(f"{str(ckpt_path)!r} holds EMA weights only and cannot resume training; "
                            f"use the run's {LAST_NAME} or {BEST_NAME}")
        cfg = merge_resume_options(cfg, ckpt.get("options", {}), str(ckpt_path), given)
    precision = resolve_precision(cfg.precision, device)
    if ctx.is_main:
        check_writable_dir(cfg.out)  # fail before any slow work

    # ---- data
    if dataset is None:
        from shared.training.data import load_dataset
        dataset = load_dataset(cfg.dataset, cfg.data_dir, quiet=not ctx.is_main)
    info = dataset.info
    if len(dataset) == 0:
        raise UserError(f"the dataset {cfg.dataset!r} holds no images")
    if cfg.class_cond and info.num_classes < 1:
        raise UserError(f"--class-cond needs labelled data; {cfg.dataset!r} has no classes")
    train_set, heldout_set = split_heldout(dataset, cfg.heldout_size, cfg.seed)
    sampler = ResumableSampler(train_set, ctx.world_size, ctx.rank, cfg.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {sampler.num_samples} training images "
                        f"per process")
    total_steps = cfg.epochs * steps_per_epoch if cfg.epochs is not None else (cfg.max_steps or DEFAULT_MAX_STEPS)
    loader_gen = torch.Generator()  # the DataLoader's own draws (worker seeds) stay off the global RNG
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", generator=loader_gen)

    # ---- model, EMA, optimizer; identical initial weights on every rank, then per-rank streams
    seed_everything(cfg.seed)
    schedule = NoiseSchedule(cfg.schedule, cfg.timesteps)
    raw_model = build_model(cfg, tuple(info.image_shape), info.num_classes).to(device)
    if cfg.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    if cfg.fused_kernels:
        raw_model.set_fused_kernels(True)  # raises kernels.FusedKernelsUnavailable; never falls back
    ema = make_ema(raw_model, cfg.ema_decay, cfg.ema_warmup)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.cosine))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    seed_everything(cfg.seed + RANK_SEED_STRIDE * ctx.rank)
    train_noise = torch.Generator(device).manual_seed(cfg.seed + RANK_SEED_STRIDE * ctx.rank)
    progress = Progress()
    if ckpt is not None:
        check_same_model(ckpt, raw_model.config, cfg.preset, ckpt_path)
        raw_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        progress = Progress.from_dict(ckpt["progress"])
        rng_states = ckpt["rng"]
        if len(rng_states) == ctx.world_size:
            restore_rng(rng_states[ctx.rank], train_noise, loader_gen)
        elif ctx.is_main:
            print(f"warning: checkpoint was written by {len(rng_states)} process(es), this run has "
                  f"{ctx.world_size}; random streams restart from the seed, so the run is not bit-exact")
    model = raw_model
    if ctx.enabled:
        model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    autocast = autocast_for(device, precision)
    heldout = fixed_heldout_batch(heldout_set, cfg.timesteps, cfg.seed, device) if heldout_set else None
    if cfg.fused_kernels:  # a kernel that cannot run here fails now, before any record is written
        raw_model.eval()  # (eval: no dropout, so the probe draws nothing from the RNG)
        with torch.no_grad(), autocast:
            raw_model(torch.zeros(1, *info.image_shape, device=device), torch.zeros(1, dtype=torch.long, device=device))
        raw_model.train()

    # ---- run records (rank 0 only)
    options = {**asdict(cfg), "precision": precision, "resolved_max_steps": total_steps,
               "steps_per_epoch": steps_per_epoch, "world_size": ctx.world_size}
    meta = {"dataset": cfg.dataset, "preset": cfg.preset, "num_classes": raw_model.num_classes,
            "image_shape": list(info.image_shape), "schedule": schedule.to_dict(), "options": options}
    run_dir, log = None, None
    if ctx.is_main:
        run_dir = make_run_dir(cfg.out, f"{cfg.dataset}-{cfg.preset}-{precision}")
        write_options(run_dir, options, device, extra={
            "dataset": info.to_dict(), "world_size": ctx.world_size, "model_parameters":
            sum(p.numel() for p in raw_model.parameters()),
            "resumed_from": str(ckpt_path) if ckpt_path else None})
        prior = [r for r in read_log(ckpt_path.parent / "log.csv") if int(r["step"]) <= progress.step] \
            if ckpt_path else []
        log = CsvLog(run_dir / "log.csv", prior)

    def save_checkpoint(name: str) -> None:
        rng = [capture_rng(train_noise, loader_gen)]
        if ctx.enabled:  # every rank's streams, so each resumes its own
            rng = [None] * ctx.world_size
            torch.distributed.all_gather_object(rng, capture_rng(train_noise, loader_gen))
        if not ctx.is_main:
            return
        state = {"format": TRAIN_FORMAT, "model_config": raw_model.config, "model": raw_model.state_dict(),
                 "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": lr_sched.state_dict(), "scaler": scaler.state_dict(),
                 "progress": progress.to_dict(), "rng": rng, "options": options,
                 "schedule": schedule.to_dict(), "meta": meta}
        atomic_save(state, run_dir / name)
        if name == LAST_NAME:
            atomic_save(ema_file(raw_model.config, ema.module.state_dict(), schedule.to_dict(), meta),
                        run_dir / EMA_NAME)

    def write_samples() -> None:
        from shared.records.images import save_grid  # imports torchvision (seconds): only when a grid is due
        from shared.diffusion.samplers import sample  # issue 4's sampler: deterministic DDIM, per-sample seeds
        # Class-conditional grids give each class a column (up to MAX_GRID_CLASSES); else 8×8.
        columns = min(raw_model.num_classes, MAX_GRID_CLASSES) if raw_model.num_classes else SAMPLE_GRID_ROWS
        n = SAMPLE_GRID_ROWS * columns
        labels = (torch.arange(n) % columns) if raw_model.num_classes else None
        images = sample(ema.module, schedule, [cfg.seed + SAMPLE_SEED_OFFSET + i for i in range(n)],
                        labels=labels, sampler="ddim", num_steps=cfg.sample_steps, clip_x0=True,
                        device=device, precision=precision, progress=False)
        save_grid(images.clamp(-1, 1), run_dir / f"samples-{progress.step:07d}.png", nrow=columns)

    def evaluate() -> tuple[float | None, bool]:
        """Held-out loss of the EMA weights on rank 0; (loss, improved)."""
        if heldout is None or not ctx.is_main:
            return None, False
        value = heldout_loss(ema.module, schedule, heldout, raw_model.num_classes > 0, cfg.batch_size, autocast)
        improved = value < progress.best_heldout
        if improved:
            progress.best_heldout, progress.evals_since_best = value, 0
        else:
            progress.evals_since_best += 1
        return value, improved

    max_grad_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, clip nothing

    def training_step(x0: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
        """One step of Algorithm 1 on a batch x0 [N x C x H x W], labels y [N].

        Returns (loss averaged over ranks, gradient norm before clipping); the norm is None when the
        step was skipped because the loss or the gradient was not finite.
        """
        n = x0.shape[0]
        t = torch.randint(0, schedule.num_timesteps, (n,), device=device, generator=train_noise)
        noise = torch.randn(x0.shape, device=device, generator=train_noise)
        if raw_model.num_classes:  # label dropout → the null class teaches ε_θ(x_t, t, ∅)
            y = y.to(device)
            drop = torch.rand(n, device=device, generator=train_noise) < cfg.p_uncond
            y = y.masked_fill(drop, raw_model.null_class)
        else:
            y = None
        x_t = q_sample(schedule, x0, t, noise)
        with autocast:
            eps_pred = model(x_t, t, y)
        loss = F.mse_loss(eps_pred.float(), noise)  # L_simple, in fp32 whatever the autocast dtype

        # -- skip non-finite steps; all ranks decide on the same (averaged) loss
        loss_value = distributed.mean_across_ranks(loss.detach(), ctx).item()
        grad_norm = None
        if math.isfinite(loss_value):
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradient, not the loss-scaled one
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_grad_norm).item()
            if math.isfinite(grad_norm):
                scaler.step(optimizer)
                scaler.update()
                ema.update_parameters(raw_model)
            else:  # fp16: an overflow at this loss scale; update() halves the scale for the next step
                if scaler.is_enabled():
                    scaler.update()
                grad_norm = None
        optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm

    # ---- the loop
    bar = tqdm(total=total_steps, initial=progress.step, disable=not ctx.is_main, unit="step",
               dynamic_ncols=True, desc="train")
    window = {"loss": 0.0, "grad_norm": 0.0, "n": 0, "time": 0.0, "images": 0}
    train_time, train_images, last_loss, stop, stopped_early = 0.0, 0, float("nan"), False, False
    last_plot, steps_here = time.monotonic(), 0
    images_per_step = cfg.batch_size * ctx.world_size
    while progress.step < total_steps and not stop:
        sampler.set_epoch(progress.epoch)
        sampler.start_batch(progress.batch_in_epoch, cfg.batch_size)
        for x0, y in loader:
            t0 = time.perf_counter()
            x0 = x0.to(device, non_blocking=True)
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            loss_value, grad_norm = training_step(x0, y)
            lr_now = lr_sched.get_last_lr()[0]
            lr_sched.step()
            if grad_norm is None:
                progress.skipped_total += 1
                progress.consecutive_skips += 1
            else:
                progress.consecutive_skips = 0
                last_loss = loss_value
            progress.step += 1
            progress.batch_in_epoch += 1
            progress.images_seen += images_per_step
            dt = time.perf_counter() - t0
            steps_here += 1
            if steps_here > 1:  # throughput leaves out the first step (torch.compile, allocator warm-up)
                train_time, train_images = train_time + dt, train_images + images_per_step
                window["time"] += dt
                window["images"] += images_per_step

            # -- bookkeeping
            if grad_norm is not None:
                window["loss"] += loss_value
                window["grad_norm"] += grad_norm
                window["n"] += 1
            final = progress.step >= total_steps
            heldout_value, improved = None, False
            if progress.step % cfg.eval_every == 0 or final:
                heldout_value, improved = evaluate()
                improved = distributed.broadcast_flag(improved, ctx, device)  # best.pt saving is collective
                stop = distributed.broadcast_flag(
                    cfg.early_stop_patience > 0 and progress.evals_since_best >= cfg.early_stop_patience,
                    ctx, device)
                stopped_early = stop
            images_per_s = window["images"] / window["time"] if window["time"] > 0 else None
            if ctx.is_main and (progress.step % cfg.log_every == 0 or heldout_value is not None or final or stop):
                log.write({"step": progress.step, "epoch": progress.epoch,
                           "loss": window["loss"] / window["n"] if window["n"] else None,
                           "heldout_loss": heldout_value, "lr": lr_now,
                           "images_per_s": round(images_per_s, 2) if images_per_s is not None else None,
                           "grad_norm": window["grad_norm"] / window["n"] if window["n"] else None,
                           "skipped": progress.skipped_total})
                window = {k: 0 for k in window}
            if ctx.is_main:
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images_per_s or 0:.0f}", refresh=False)
                bar.update(1)
            if progress.consecutive_skips >= cfg.max_consecutive_skips:
                bar.close()
                raise UserError(f"stopping: {progress.consecutive_skips} consecutive steps had a non-finite "
                                f"loss or gradient (step {progress.step}); the last good checkpoint is kept"
                                + (f" in {run_dir}" if run_dir else ""))
            if improved:
                save_checkpoint(BEST_NAME)
            if progress.step % cfg.ckpt_every == 0 or final or stop:
                save_checkpoint(LAST_NAME)
            if ctx.is_main and (progress.step % cfg.sample_every == 0 or final or stop):
                write_samples()
            if ctx.is_main and (final or stop or time.monotonic() - last_plot > PLOT_INTERVAL_S):
                plot_loss(run_dir / "log.csv", run_dir / "loss.png")
                last_plot = time.monotonic()
            if final or stop:
                break
        else:  # the epoch ran out: the next one starts from its first batch
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    if log is not None:
        log.close()
    distributed.barrier(ctx)
    images_per_s = train_images / train_time if train_time > 0 else math.nan
    return TrainResult(run_dir, progress, images_per_s, last_loss, stopped_early,
                       progress.epoch + progress.batch_in_epoch / steps_per_epoch, raw_model, ema.module)
