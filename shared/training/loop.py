"""The training job: Ho et al. 2020's Algorithm 1 with L_simple (Eq. 14), as a `Trainer` that owns a run.

    repeat                                                           Trainer.run
        x0 ~ q(x0)  (K micro-batches of the epoch's order)           Trainer.rest_of_epoch
        t ~ Uniform{0, …, T−1},  ε ~ N(0, I)                         GradientStep.loss
        x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε                   (q_sample, Eq. 4)
        gradient step on  L_simple = ‖ε − ε_θ(x_t, t[, y])‖²         GradientStep.backward, .update
        logs, evaluation, checkpoints, grids as due                  Trainer.bookkeeping
    until the last step, early stopping or a signal

`GradientStep` is one iteration, on its own so tests can drive it with a hand-built TrainState: AdamW on
the (min-SNR-weighted) L_simple with gradient clipping, bf16/fp16 autocast (fp16 with a GradScaler),
label dropout to the null class for classifier-free guidance (Ho & Salimans 2022), the EMA of the
weights, and gradient accumulation: one optimizer step over K micro-batches is the gradient of a K-times
larger batch, all-reduced once under DistributedDataParallel.

`Trainer` is the rest of the job: it builds the state (or resumes it exactly), draws the batches, and
after each step does the bookkeeping in named helpers: `evaluate` (the held-out loss of the EMA weights
with fixed t and ε; early stopping on it), `log_row`, `stop_on_non_finite`, `save_records` (best.pt,
last.pt and ema.pt by recorder.py's rules, sample grids, loss.png). `train(cfg)` builds one and runs it.

The step never waits on the host: the loss, the gradient norm and the finite check stay on the device;
a non-finite step is masked out of the optimizer (fused AdamW's found_inf) and the EMA (a zero weight)
by a device flag, and the values are read only when a log row is written.

The parts: config.py (options), loss.py (L_simple), batches.py (data order), state.py (what a checkpoint
holds), heldout.py (the held-out loss), recorder.py (logs, grids, checkpoints), signals.py and
distributed.py (clean stops, several processes).
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from shared.data.datasets import load_training_dataset, without_judge_heldout
from shared.diffusion.noise import seed_everything
from shared.diffusion.prediction import prediction_of, set_prediction
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
from shared.training.config import (TrainConfig, check_config, merge_resume_options, resolve_cuda_graphs,
                                    resolve_precision, resolved_length)
from shared.training.distributed import DistContext
from shared.training.graphed import CounterDraws, GraphedStep
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
    out_of_time: bool = False       # stopped by the --minutes budget before the last step


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
            trainer = Trainer(cfg, ctx, device, signals, dataset, given)
            if note and ctx.is_main:
                print(note, file=sys.stderr)
            try:
                return trainer.run()
            finally:
                trainer.close()
    finally:
        distributed.cleanup(ctx)


# --------------------------------------------------------------------------------------------------
# One iteration of Algorithm 1

def masked_optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() that changes nothing (weights, moments, step count) where the 0-dim bool device
    tensor `skip` is true, without reading it on the host: fused AdamW honours `found_inf` in-kernel."""
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@dataclass(frozen=True)
class GradientStep:
    """One iteration of Algorithm 1: an optimizer step of `state` on K micro-batches. No host sync.

    model: what the forwards run through: state.model, or its DistributedDataParallel / torch.compile
    wrapper. autocast: the context the network runs in. max_grad_norm: the clip (inf: measure the norm,
    clip nothing). p_uncond: the label dropout to the null class (class-conditional models).
    min_snr_gamma: 0 trains on L_simple; γ > 0 weights each image's L_simple by min(1, γ/SNR_t) (or the
    weight of the network's target, v or x0: loss.min_snr_weight). draws: None draws the label dropout,
    t and ε from state.train_noise; a graphed.CounterDraws draws them from Philox counters on the device
    (what a CUDA graph can replay). schedule: on the device the step runs on (NoiseSchedule.to), so the
    per-sample coefficients are gathered there.
    """
    state: TrainState
    model: torch.nn.Module
    schedule: NoiseSchedule
    autocast: AbstractContextManager = nullcontext()
    max_grad_norm: float = math.inf
    p_uncond: float = 0.0
    min_snr_gamma: float = 0.0
    ctx: DistContext = DistContext()
    draws: CounterDraws | None = None

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
        """Steps on [(x0 [N x C x H x W], y [N]), …] (K pairs of equal N, on the device).

        Returns device tensors: (loss averaged over micro-batches and ranks, gradient norm before
        clipping, skipped flag). A step with a non-finite loss or gradient changes nothing but the
        skip counters."""
        loss = self.backward(micro_batches)
        grad_norm, skip = self.update(loss)
        return loss, grad_norm, skip

    def loss(self, x0: torch.Tensor, y: torch.Tensor, micro: int = 0) -> torch.Tensor:
        """L_simple (or its min-SNR-γ weighting) averaged over x0 [N x C x H x W], y [N]: a 0-dim device tensor.

        The label dropout, t and ε are drawn from state.train_noise in that order, once per call, or
        from the draws' counter for micro-batch `micro` of this step."""
        raw, noise, eps = self.state.model, self.state.train_noise, None
        if self.draws is not None:
            labels = (y, raw.null_class, self.p_uncond) if raw.num_classes else (None, None, 0.0)
            y, t, eps = self.draws.draw(micro, *labels)
        else:
            y = drop_labels(y, self.p_uncond, raw.null_class, noise) if raw.num_classes else None
            # t drawn here, first, as l_simple would draw it: the same stream, and the weights need it
            t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=noise)
        per_image = l_simple(self.model, self.schedule, x0, y, t, eps, generator=noise, autocast=self.autocast)
        if self.min_snr_gamma > 0:  # the weights of the network's target (ε, v or x0)
            per_image = per_image * min_snr_weight(self.schedule, t, self.min_snr_gamma, prediction_of(raw))
        return per_image.mean()

    def backward(self, micro_batches) -> torch.Tensor:
        """Accumulates the gradient of the mean loss over all K·N images; returns that loss (all ranks' mean).

        Each micro-loss is scaled by 1/K before its backward, so the summed gradient is that of one
        K-times larger batch. Under DDP the first K−1 backwards run in no_sync (gradients accumulate
        locally) and the last one all-reduces the sum once. fp16's GradScaler scales every micro-loss by
        the same factor."""
        k, loss_sum = len(micro_batches), None
        for i, (x0, y) in enumerate(micro_batches):
            with distributed.no_sync(self.model) if i < k - 1 else nullcontext():
                loss = self.loss(x0, y, i) / k
                self.state.scaler.scale(loss).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        return distributed.mean_across_ranks(loss_sum, self.ctx)  # every rank decides on the same value

    def update(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips, steps the optimizer and the EMA unless the loss or gradient is non-finite, clears the
        gradients; returns (gradient norm before clipping, skipped), both on the device."""
        state = self.state
        state.scaler.unscale_(state.optimizer)  # clip the true gradient, not the loss-scaled one
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), self.max_grad_norm)
        skip = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        masked_optimizer_step(state.optimizer, skip)
        state.scaler.update()  # fp16: an overflow halves the loss scale for the next step
        state.ema.update_parameters(state.model, skip=skip)
        state.optimizer.zero_grad(set_to_none=True)
        state.count_step(skip)
        if self.draws is not None:
            self.draws.advance()
        return grad_norm, skip


# --------------------------------------------------------------------------------------------------
# The job

class Trainer:
    """One training run: its options, the TrainState, the model it trains through, the batches, the
    held-out batch, the recorder, autocast and the stop signals; `run()` trains it to the end.

    Built in the order that makes a resumed run bit-exact (the model's seed first, then the
    checkpoint's state and random streams, then the per-rank streams the steps draw from), and checked
    before any record is written (options, output folder, data, fused kernels).
    """

    def __init__(self, cfg: TrainConfig, ctx: DistContext, device: torch.device, signals: StopSignals,
                 dataset=None, given: set[str] | None = None):
        cfg, ckpt, self.resumed_from = _resume_point(cfg, given)
        self.cfg, self.ctx, self.device, self.signals = cfg, ctx, device, signals
        self.precision = resolve_precision(cfg.precision, device)
        self.graphed = resolve_cuda_graphs(cfg, self.precision, device, ctx.world_size)
        _check_records_can_be_written(cfg, ctx)  # fail before any slow work
        self.info, self.batches, heldout_set, excluded = _data(cfg, dataset, ctx, device)
        k = cfg.grad_accum
        self.steps_per_epoch = self.batches.steps_per_epoch // k  # optimizer steps; a last partial group is dropped
        self.micro_per_epoch = self.steps_per_epoch * k  # the micro-batches of whole optimizer steps
        self.images_per_step = cfg.batch_size * ctx.world_size * k
        self.total_steps = resolved_length(cfg, self.steps_per_epoch)
        self.schedule = NoiseSchedule(cfg.schedule, cfg.timesteps)
        self.state = _build_state(replace(cfg, precision=self.precision), self.info, device, ctx, self.total_steps,
                                  self.batches.loader_gen, self.graphed)
        if ckpt is not None:
            self._restore(ckpt)
        self.model = _wrap(self.state.model, cfg, ctx, device)
        self.autocast = autocast_for(device, self.precision)
        self.heldout = fixed_heldout_batch(heldout_set, cfg.timesteps, cfg.seed, device) if heldout_set else None
        if cfg.fused_kernels:
            _probe_fused(self.state.model, self.info, device, self.autocast)
        self.gradient_step = self._gradient_step()
        self.recorder = self._recorder(excluded)
        # the loop's own: the log window, the progress bar (run() opens it), the stop reason, throughput
        self.window, self.bar = Window(device), None
        self.stop, self.stopped_early, self.steps_here = None, False, 0
        self.timed_s, self.timed_images, self.last_loss = 0.0, 0, math.nan
        self.started = time.perf_counter()  # run() restarts it: the --minutes budget counts training only

    @property
    def progress(self) -> Progress:
        return self.state.progress  # (read through the state: a resume replaces it)

    @property
    def final(self) -> bool:
        return self.progress.step >= self.total_steps

    def run(self) -> TrainResult:
        """Algorithm 1 from the current step to the last one or a stop. Raises Interrupted after a signal."""
        progress = self.progress
        self.bar = tqdm(total=self.total_steps, initial=progress.step, disable=not self.ctx.is_main, unit="step",
                        dynamic_ncols=True, desc="train")
        self.started = time.perf_counter()
        while progress.step < self.total_steps and self.stop is None:
            for micro_batches in self.rest_of_epoch():  # x0 ~ q(x0)
                lr = self.scheduled_lr()  # the LR this step trains with
                loss, grad_norm, skip = self.step(micro_batches)  # t, ε and the gradient step on L_simple
                self.after_step(loss, grad_norm, skip, lr)
                if self.final or self.stop:
                    break
            else:  # the epoch ran out: the next one starts from its first batch
                progress.epoch += 1
                progress.batch_in_epoch = 0
        self.bar.close()
        return self.result()

    def scheduled_lr(self) -> float:
        """The LR of the next step, from the schedule on the host (the optimizer's may be a device tensor)."""
        sched = self.state.lr_scheduler
        return sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch)

    def rest_of_epoch(self):
        """The current epoch from its next micro-batch on, as lists of K micro-batches (one optimizer step
        each) [(x0 [N x C x H x W], y [N]), …] in the model's memory format; the micro-batches after the
        epoch's last whole group are not drawn."""
        progress, k = self.progress, self.cfg.grad_accum
        start = progress.batch_in_epoch
        micro = islice(self.batches.epoch(progress.epoch, start), self.micro_per_epoch - start)
        while group := list(islice(micro, k)):
            if self.cfg.channels_last:  # the inputs in the layout the model was converted to
                group = [(x0.contiguous(memory_format=torch.channels_last), y) for x0, y in group]
            yield group

    def step(self, micro_batches) -> tuple:
        """One optimizer step of Algorithm 1 on K micro-batches, with the LR schedule and the counters
        advanced. No host sync: returns the device tensors (loss, gradient norm, skipped)."""
        loss, grad_norm, skip = self.gradient_step(micro_batches)
        self.state.lr_scheduler.step()
        progress = self.progress
        progress.step += 1
        progress.batch_in_epoch += self.cfg.grad_accum
        progress.images_seen += self.images_per_step
        return loss, grad_norm, skip

    def after_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, skip: torch.Tensor, lr: float) -> None:
        """The step's values into the log window (on the device), then the bookkeeping due after it; the
        throughput clock times the training steps only."""
        self.window.add(loss, grad_norm, ~skip, self.images_per_step)
        self.steps_here += 1
        if self.steps_here == 1:  # throughput leaves out the first step (torch.compile, allocator warm-up)
            self.window.start_clock()
        if self.signals.received is not None and not self.ctx.enabled:
            self.stop = "interrupted"
        self.bookkeeping(lr)
        if self.window.clock is None:  # a row was written: time the next steps, not the bookkeeping
            self.window.start_clock()

    # ----------------------------------------------------------------------------------------------
    # Bookkeeping: the only host reads of the steps' values

    def bookkeeping(self, lr: float) -> None:
        """Evaluation, the log row with its stop checks, checkpoints, grids and plots due after this step.
        lr: the learning rate the step trained with."""
        if self.progress.step == self.plan_step:
            self.fit_to_budget()
        due = due_at(self.progress.step, self.cfg, self.final)
        if due.log and self.out_of_time():
            self.stop = self.stop or "time"
        heldout_value, improved = self.evaluate() if due.evaluate else (None, False)
        # decided alike on every rank: log_row holds collectives
        if due.log or (due.evaluate and self.heldout is not None) or self.stop:
            self.log_row(lr, heldout_value)
        if self.ctx.is_main:
            self.bar.update(1)
        self.save_records(due, improved)

    def clock_s(self) -> float:
        """Seconds since this run's first step started, bookkeeping included (the --minutes clock)."""
        return time.perf_counter() - self.started

    def minutes_left(self) -> float | None:
        """What is left of the --minutes budget (None without one), on this rank's clock."""
        if self.cfg.minutes is None:
            return None
        return self.cfg.minutes - self.clock_s() / 60

    @property
    def plan_step(self) -> int | None:
        """The step after which a --minutes budget with a cosine decay fits the run's length to the time:
        the end of the warm-up, before the decay has begun (None: nothing to plan)."""
        if self.cfg.minutes is None or not self.cfg.cosine:
            return None
        return max(self.cfg.warmup_steps, 1)

    def fit_to_budget(self) -> None:
        """Shortens the run, once, so that its cosine decay ends inside the --minutes budget at the speed the
        steps so far ran (rank 0's clock); the new length goes into options.json and every later
        checkpoint, so --resume keeps it. A run that fits is left as it was."""
        if self.steps_here < 1 or self.final:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock must see the queued steps
        elapsed = self.clock_s()
        fit = steps_in_budget(self.progress.step, self.total_steps, elapsed / self.steps_here,
                              self.cfg.minutes * 60 - elapsed)
        fit = distributed.broadcast_int(fit, self.ctx, self.device)
        if fit >= self.total_steps:
            return
        if self.ctx.is_main:
            rate = self.images_per_step * self.steps_here / elapsed
            tqdm.write(f"note: at {rate:.0f} images/s the {self.total_steps} steps would overrun the "
                       f"{self.cfg.minutes:g}-minute budget; the cosine decay now ends at step {fit}", file=sys.stdout)
        self.total_steps, self.cfg = fit, replace(self.cfg, max_steps=fit, epochs=None)
        cfg = self.cfg
        self.state.lr_scheduler.lr_lambdas = [lambda s: lr_factor(s, cfg.warmup_steps, fit, cfg.cosine)]
        self.recorder.replan(cfg.max_steps)
        self.bar.total = fit

    def out_of_time(self) -> bool:
        """Whether the --minutes budget is spent: rank 0's clock decides for every rank (checked at the log
        rows, which every rank reaches at the same step)."""
        left = self.minutes_left()
        return left is not None and agree(left <= 0, self.ctx, self.device)

    def evaluate(self) -> tuple[float | None, bool]:
        """(the held-out loss of the EMA weights, or None without a held-out set or off rank 0; whether it
        is the best so far, known to every rank), and the early-stopping rule on it."""
        progress, value, improved = self.progress, None, False
        if self.heldout is not None and self.ctx.is_main:
            value = heldout_loss(self.state.ema.module, self.schedule, self.heldout, self.state.model.num_classes > 0,
                                 self.cfg.batch_size, self.autocast)
            improved = value < progress.best_heldout
            if improved:
                progress.best_heldout, progress.evals_since_best = value, 0
            else:
                progress.evals_since_best += 1
        improved = agree(improved, self.ctx, self.device)  # best.pt saving is collective
        patience = self.cfg.early_stop_patience
        if agree(patience > 0 and progress.evals_since_best >= patience, self.ctx, self.device):
            self.stop, self.stopped_early = self.stop or "early", True
        return value, improved

    def log_row(self, lr: float, heldout_value: float | None) -> None:
        """Reads the window (the one host read of the steps' values), writes the log row, then stops on
        a run of non-finite steps."""
        if self.ctx.enabled and distributed.any_rank(self.signals.received is not None, self.ctx, self.device):
            self.stop = self.stop or "interrupted"  # a signal that reached some ranks stops them all
        row = self.window.read()
        progress = self.state.sync_progress()
        if row["loss"] is not None:
            self.last_loss = row["loss"]
        self.timed_s, self.timed_images = self.timed_s + row["time"], self.timed_images + row["images"]
        self.recorder.write_row({"step": progress.step, "epoch": progress.epoch, "loss": row["loss"],
                                 "heldout_loss": heldout_value, "lr": lr, "images_per_s": row["images_per_s"],
                                 "grad_norm": row["grad_norm"], "skipped": progress.skipped_total})
        budget = {} if self.minutes_left() is None else {"budget_left": f"{max(self.minutes_left(), 0):.1f} min"}
        self.bar.set_postfix(loss=f"{row['loss'] or math.nan:.4f}", img_s=f"{row['images_per_s'] or 0:.0f}",
                             **budget, refresh=False)
        self.stop_on_non_finite()

    def stop_on_non_finite(self) -> None:
        """UserError after max_consecutive_skips non-finite steps in a row (counted at the last sync)."""
        progress = self.progress
        if progress.consecutive_skips >= self.cfg.max_consecutive_skips:
            self.bar.close()
            raise UserError(f"stopping: {progress.consecutive_skips} consecutive steps had a non-finite loss or "
                            f"gradient (step {progress.step}); {self.recorder.where_saved()}")

    def save_records(self, due: Due, improved: bool) -> None:
        """best.pt on a better held-out loss; last.pt (with ema.pt) when due or stopping; the sample grid
        when due or stopped early; loss.png now and then and at the end."""
        final, stop = self.final, self.stop
        ends = final or stop in ("early", "time")  # the run ends here as planned, not by a signal
        if improved:
            self.checkpoint(BEST_NAME)
        if due.checkpoint or stop:
            self.checkpoint(LAST_NAME, in_skip_run_ok=ends)
        if self.ctx.is_main and (due.samples or stop in ("early", "time")):  # an interrupted run exits without a grid
            self.recorder.samples(self.state.ema.module, self.schedule, self.progress.step, self.precision)
        if self.ctx.is_main:
            self.recorder.plot(force=final or bool(stop))

    def checkpoint(self, name: str, in_skip_run_ok: bool = False) -> bool:
        """Writes checkpoint `name` if the state is healthy (Recorder.checkpoint's rules); collective under
        DDP. Returns whether it was written."""
        return self.recorder.checkpoint(self.state, self.schedule, name, in_skip_run_ok=in_skip_run_ok)

    # ----------------------------------------------------------------------------------------------
    # The end of a run

    def result(self) -> TrainResult:
        """The finished run's result; Interrupted instead when a signal stopped it."""
        if self.stop == "interrupted":
            raise self._interrupted()
        distributed.barrier(self.ctx)
        progress = self.progress
        images_per_s = self.timed_images / self.timed_s if self.timed_s > 0 else math.nan
        return TrainResult(self.recorder.run_dir, progress, images_per_s, self.last_loss, self.stopped_early,
                           progress.epoch + progress.batch_in_epoch / self.micro_per_epoch, self.state.model,
                           self.state.ema.module, out_of_time=self.stop == "time")

    def close(self) -> None:
        self.recorder.close()

    def _interrupted(self) -> Interrupted:
        signum, saved, run_dir = self.signals.received, self.recorder.saved_step, self.recorder.run_dir
        where = f"last.pt at step {saved}" if saved is not None else "no checkpoint"
        return Interrupted(signum, f"{StopSignals.name(signum)}: stopped after step {self.progress.step}; {where}"
                           + (f" in {run_dir}" if run_dir else "")
                           + (" (resume with --resume)" if saved is not None else ""))

    # ----------------------------------------------------------------------------------------------
    # Set-up helpers that need the trainer's parts

    def _restore(self, ckpt: dict) -> None:
        """The checkpoint's state into this run's (the same model); its random streams when the number of
        processes matches, else a warning that the run is not bit-exact."""
        check_same_model(ckpt, self.state.model.config, self.cfg.preset, self.resumed_from)
        if not self.state.load_state_dict(ckpt, self.ctx.rank, self.ctx.world_size) and self.ctx.is_main:
            print(f"warning: checkpoint was written by {len(ckpt['rng'])} process(es), this run has "
                  f"{self.ctx.world_size}; random streams restart from the seed, so the run is not bit-exact")

    def _gradient_step(self):
        """The step the loop calls: a GradientStep, or with CUDA graphs a GraphedStep around one whose
        t, ε and label dropout come from counters that start at this run's step."""
        cfg, ctx = self.cfg, self.ctx
        draws = None
        if self.graphed:
            draws = CounterDraws(rank_seed(cfg.seed, ctx.rank), cfg.batch_size, tuple(self.info.image_shape),
                                 cfg.timesteps, cfg.grad_accum, self.device)
            draws.start_at(self.progress.step)
        step = GradientStep(self.state, self.model, self.schedule.to(self.device), self.autocast,
                            cfg.grad_clip if cfg.grad_clip > 0 else math.inf, cfg.p_uncond, cfg.min_snr_gamma, ctx,
                            draws)
        return GraphedStep(step, capture=self.device.type == "cuda") if self.graphed else step

    def _recorder(self, excluded) -> Recorder:
        """The run directory (rank 0) with options.json: the resolved options, what a checkpoint's meta
        says about the model, and the facts of this run."""
        cfg, ctx, raw = self.cfg, self.ctx, self.state.model
        options = {**asdict(cfg), "precision": self.precision, "cuda_graphs_used": self.graphed,
                   "resolved_max_steps": self.total_steps,
                   "steps_per_epoch": self.steps_per_epoch, "world_size": ctx.world_size,
                   "judge_heldout_excluded": excluded, "data_on_device": self.batches.on_device}
        meta = {"dataset": cfg.dataset, "preset": cfg.preset, "num_classes": raw.num_classes,
                "image_shape": list(self.info.image_shape), "schedule": self.schedule.to_dict(),
                "prediction": prediction_of(raw), "options": options}
        extra = {"dataset": self.info.to_dict(), "world_size": ctx.world_size,
                 "model_parameters": sum(p.numel() for p in raw.parameters()),
                 "resumed_from": str(self.resumed_from) if self.resumed_from else None}
        return Recorder(ctx, cfg, options, meta, extra, self.device, self.resumed_from, self.progress.step)


# --------------------------------------------------------------------------------------------------
# Set-up

def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s own random streams."""
    return seed + RANK_SEED_STRIDE * rank


def lr_factor(step: int, warmup_steps: int, total_steps: int, cosine: bool) -> float:
    """Multiplier of the base LR at `step`: linear warm-up to 1, then 1 or a cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def steps_in_budget(step: int, total_steps: int, seconds_per_step: float, seconds_left: float,
                    margin: float = 0.95) -> int:
    """The run's length in steps so that the steps after `step`, at `seconds_per_step`, take at most
    `margin` of `seconds_left` (the rest for evaluations, grids and the last checkpoint); never more than
    `total_steps`, never less than `step`."""
    if seconds_per_step <= 0:
        return total_steps
    more = math.floor(margin * max(seconds_left, 0.0) / seconds_per_step)
    return max(step, min(total_steps, step + more))


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


def _check_records_can_be_written(cfg: TrainConfig, ctx: DistContext) -> None:
    """--tensorboard's package and a writable --out that is not itself a run directory (rank 0 writes)."""
    if cfg.tensorboard:
        check_tensorboard()
    if ctx.is_main:
        check_not_run_dir(cfg.out)
        check_writable_dir(cfg.out)


def _data(cfg: TrainConfig, dataset, ctx: DistContext, device: torch.device):
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
    batches = Batches(train_set, cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed, device, cfg.num_workers,
                      random_flip=cfg.random_flip)
    if batches.steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {batches.sampler.num_samples} training images "
                        f"per process")
    if batches.steps_per_epoch < cfg.grad_accum:
        raise UserError(f"--grad-accum {cfg.grad_accum} exceeds the {batches.steps_per_epoch} micro-batches of "
                        f"--batch-size {cfg.batch_size} in an epoch per process")
    return dataset.info, batches, heldout_set, excluded


def _build_state(cfg: TrainConfig, info, device: torch.device, ctx: DistContext, total_steps: int,
                 loader_gen: torch.Generator, graphed: bool = False) -> TrainState:
    """Model, EMA, optimizer, LR schedule, scaler: identical initial weights on every rank.

    cfg.precision: the resolved one (fp16 turns the GradScaler on). graphed: the optimizer for a CUDA
    graph (capturable; graphed.GraphedStep gives it the device-tensor lr the graph reads)."""
    seed_everything(cfg.seed)
    raw_model = build_model(cfg, tuple(info.image_shape), info.num_classes).to(device)
    set_prediction(raw_model, cfg.prediction)  # what its output means; the EMA copy below inherits it
    if cfg.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    if cfg.fused_kernels:
        raw_model.set_fused_kernels(True)  # raises kernels.FusedKernelsUnavailable; never falls back
    ema = make_ema(raw_model, cfg.ema_decay, cfg.ema_warmup)
    # fused: one kernel per step on CPU and CUDA, and its found_inf masks a skipped step on the device
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True,
                                  capturable=graphed)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.cosine))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    seed_everything(rank_seed(cfg.seed, ctx.rank))  # then per-rank streams
    train_noise = torch.Generator(device).manual_seed(rank_seed(cfg.seed, ctx.rank))
    return TrainState(raw_model, ema, optimizer, lr_sched, scaler, train_noise, loader_gen, device)


def _wrap(raw_model: torch.nn.Module, cfg: TrainConfig, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """What the forwards run through: DistributedDataParallel across processes, then torch.compile."""
    model = raw_model
    if ctx.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def _probe_fused(raw_model, info, device: torch.device, autocast) -> None:
    """A fused kernel that cannot run here fails now, before any record is written."""
    raw_model.eval()  # (eval: no dropout, so the probe draws nothing from the RNG)
    with torch.no_grad(), autocast:
        raw_model(torch.zeros(1, *info.image_shape, device=device), torch.zeros(1, dtype=torch.long, device=device))
    raw_model.train()
