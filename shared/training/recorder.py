"""The records of a run: what is due at a step (`due_at`), the log window of device-side sums, and the
run directory's files (log.csv, loss.png, sample grids, checkpoints). loop.Trainer's bookkeeping asks
for them after each step; rank 0 writes every file; the other ranks join the collectives.

Checkpoints follow two rules:
  - only a finite, healthy state is written: never while steps are being skipped as non-finite, never
    from weights, EMA or optimizer state holding a NaN or inf; a run that stops on non-finite steps
    keeps the last finite checkpoint and says which step it is from;
  - ema.pt is written before last.pt, so after a kill between the two writes ema.pt is at most one
    checkpoint ahead of last.pt, and a resume from last.pt rewrites it with the same weights (exact
    resume); sampling never reads EMA weights older than the training state.

With --tensorboard, <run>/tensorboard/ also receives every log.csv row's values (same names, same steps)
and every sample grid; log.csv stays the record.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.diffusion.samplers import SamplerOptions, sample
from shared.errors import UserError
from shared.records.checkpoint import (EMA_NAME, LAST_NAME, TRAIN_FORMAT, atomic_save, ema_file,
                                       remove_stale_temp_files)
from shared.records.images import grid_image
from shared.records.plots import plot_loss
from shared.records.runs import CsvLog, make_run_dir, read_log, write_options
from shared.training import distributed
from shared.training.state import TrainState, capture_rng

TENSORBOARD_DIR = "tensorboard"
SNAPSHOT_PREFIX = "ema-"  # --keep-snapshots K keeps the last K of ema-<step>.pt beside ema.pt

SAMPLE_GRID_ROWS = 8            # sample grids have 8 rows (and 8 columns, or one per class)
MAX_GRID_CLASSES = 16
SAMPLE_SEED_OFFSET = 2_000_003  # grid image i uses seed + offset + i, the same at every grid
PLOT_INTERVAL_S = 30.0          # loss.png is redrawn at most this often (matplotlib is slow) and at the end


@dataclass(frozen=True)
class Due:
    """What the bookkeeping does after a step."""
    log: bool
    evaluate: bool
    checkpoint: bool
    samples: bool


def due_at(step: int, cfg, final: bool) -> Due:
    """The one place that decides, from the --*-every options, what is due after `step` (1-based)."""
    def every(n: int) -> bool:
        return step % n == 0 or final
    return Due(log=every(cfg.log_every), evaluate=every(cfg.eval_every), checkpoint=every(cfg.ckpt_every),
               samples=every(cfg.sample_every))


class Window:
    """Sums of the logged values since the last log row, kept on the device (read once per row), and the
    wall clock of the training steps since then (started after the work queued before it is done)."""

    def __init__(self, device: torch.device):
        self.device, self.clock = device, None
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, grad norm, finite steps
        self.images = 0

    def start_clock(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.clock, self.images = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, images: int) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums += torch.stack([torch.where(ok, loss.double(), zero), torch.where(ok, grad_norm.double(), zero),
                                  ok.double()])
        if self.clock is not None:
            self.images += images

    def read(self) -> dict:
        """{'loss', 'grad_norm' (means over the finite steps, None if none), 'images_per_s', and the
        'time' and 'images' it was measured over}; resets and stops the clock. The one host read."""
        loss_sum, grad_sum, n = self.sums.tolist()  # waits for the queued steps, so the clock is true
        elapsed = time.perf_counter() - self.clock if self.clock is not None else 0.0
        row = {"loss": loss_sum / n if n else None, "grad_norm": grad_sum / n if n else None,
               "images_per_s": round(self.images / elapsed, 2) if elapsed > 0 and self.images else None,
               "time": elapsed if self.images else 0.0, "images": self.images}
        self.reset()
        self.clock = None
        return row


class Recorder:
    """The run directory and everything written into it."""

    def __init__(self, ctx, cfg, options: dict, meta: dict, extra: dict, device: torch.device,
                 resumed_from: Path | None, start_step: int):
        self.ctx, self.cfg, self.options, self.meta, self.device = ctx, cfg, options, meta, device
        self.extra = extra
        self.run_dir, self.log, self.tensorboard, self.last_plot = None, None, None, time.monotonic()
        self.saved_step: int | None = None  # the step of the last last.pt written (None: none yet)
        if not ctx.is_main:
            return
        if resumed_from is not None:
            remove_stale_temp_files(resumed_from.parent)
        self.run_dir = make_run_dir(cfg.out, f"{cfg.dataset}-{cfg.preset}-{options['precision']}")
        write_options(self.run_dir, options, device, extra=extra)
        prior = [r for r in read_log(resumed_from.parent / "log.csv") if int(r["step"]) <= start_step] \
            if resumed_from else []
        self.log = CsvLog(self.run_dir / "log.csv", prior)
        if cfg.tensorboard:
            self.tensorboard = TensorBoardLog(self.run_dir / TENSORBOARD_DIR)
            for old in prior:
                self.tensorboard.scalars({k: float(v) if v not in ("", None) else None for k, v in old.items()})

    def replan(self, max_steps: int) -> None:
        """The run's length changed (a --minutes budget fitted it): options.json and the options every
        later checkpoint carries say so."""
        self.options.update(max_steps=max_steps, epochs=None, resolved_max_steps=max_steps)
        if self.run_dir is not None:
            write_options(self.run_dir, self.options, self.device, extra=self.extra)

    def write_row(self, row: dict) -> None:
        if self.log is not None:
            self.log.write(row)
        if self.tensorboard is not None:
            self.tensorboard.scalars(row)

    def plot(self, force: bool) -> None:
        if self.run_dir is not None and (force or time.monotonic() - self.last_plot > PLOT_INTERVAL_S):
            with _one_line_write_errors(self.run_dir / "loss.png"):
                plot_loss(self.run_dir / "log.csv", self.run_dir / "loss.png")
            self.last_plot = time.monotonic()

    def checkpoint(self, state: TrainState, schedule, name: str, in_skip_run_ok: bool = False) -> bool:
        """Writes `name` (last.pt also writes ema.pt, first) if the state is healthy; collective under DDP.

        Returns whether it was written. Healthy: every weight, EMA weight and optimizer value finite, and
        (unless in_skip_run_ok, for the end of a run that finished its steps) no run of skipped steps
        going on, since a run of non-finite steps is how divergence starts. Every rank sees the same
        values, so all ranks agree.
        """
        in_skip_run = state.sync_progress().consecutive_skips > 0
        if (in_skip_run and not in_skip_run_ok) or not state.is_finite():
            return False
        rng = [capture_rng(state.train_noise, state.loader_gen)]
        if self.ctx.enabled:  # every rank's streams, so each resumes its own
            rng = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(rng, capture_rng(state.train_noise, state.loader_gen))
        step = state.progress.step
        if name == LAST_NAME:
            self.saved_step = step
        if not self.ctx.is_main:
            return True
        meta = {**self.meta, "step": step}
        if name == LAST_NAME:
            weights = ema_file(state.model.config, state.ema.module.state_dict(), schedule.to_dict(), meta)
            atomic_save(weights, self.run_dir / EMA_NAME)
            if self.cfg.keep_snapshots:
                atomic_save(weights, self.run_dir / snapshot_name(step))
                prune_snapshots(self.run_dir, self.cfg.keep_snapshots)
        atomic_save({"format": TRAIN_FORMAT, "model_config": state.model.config, **state.state_dict(rng),
                     "options": self.options, "schedule": schedule.to_dict(), "meta": meta}, self.run_dir / name)
        if self.tensorboard is not None:  # the events reach disk at least as often as the checkpoints
            self.tensorboard.flush()
        return True

    def samples(self, ema_module, schedule, step: int, precision: str) -> None:
        """A DDIM grid from the EMA weights with fixed per-image seeds, so grids compare across steps."""
        if self.run_dir is None:
            return
        num_classes = ema_module.num_classes
        # Class-conditional grids give each class a column (up to MAX_GRID_CLASSES); else 8×8.
        columns = min(num_classes, MAX_GRID_CLASSES) if num_classes else SAMPLE_GRID_ROWS
        n = SAMPLE_GRID_ROWS * columns
        labels = (torch.arange(n) % columns) if num_classes else None
        opts = SamplerOptions(sampler="ddim", num_steps=self.cfg.sample_steps, clip_x0=True, precision=precision)
        images = sample(ema_module, schedule, [self.cfg.seed + SAMPLE_SEED_OFFSET + i for i in range(n)], opts,
                        labels, self.device, progress=False)
        path = self.run_dir / f"samples-{step:07d}.png"
        grid = grid_image(images.clamp(-1, 1), nrow=columns)
        with _one_line_write_errors(path):
            grid.save(path)
        if self.tensorboard is not None:
            self.tensorboard.image("samples", grid, step)

    def where_saved(self) -> str:
        """'the last finite checkpoint is <dir>/last.pt from step N', or that there is none."""
        if self.saved_step is None:
            return "no checkpoint was written (none was due before the first non-finite step)"
        return f"the last finite checkpoint is {LAST_NAME} from step {self.saved_step}" + (
            f" in {self.run_dir}" if self.run_dir else "")

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def check_tensorboard() -> None:
    """--tensorboard fails at the start, before any record exists, when torch.utils.tensorboard cannot import."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None


class TensorBoardLog:
    """TensorBoard events beside log.csv: each row's values as scalars named like its columns at the row's
    step, and the sample grids as images."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, row: dict) -> None:
        """row: a log.csv row ('step' and the logged values; None for a value not measured at that step)."""
        step = int(row["step"])
        for name, value in row.items():
            if name != "step" and value is not None:
                self.writer.add_scalar(name, value, step)

    def image(self, tag: str, image, step: int) -> None:
        """image: a PIL RGB image."""
        self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def snapshot_name(step: int) -> str:
    """ema-<step>.pt, zero-padded so that names sort by step (as samples-<step>.png do)."""
    return f"{SNAPSHOT_PREFIX}{step:07d}.pt"


def snapshot_step(path: Path) -> int | None:
    """The step of an ema-<step>.pt name, None for any other name."""
    digits = path.stem[len(SNAPSHOT_PREFIX):]
    return int(digits) if path.suffix == ".pt" and path.stem.startswith(SNAPSHOT_PREFIX) and digits.isdigit() else None


def prune_snapshots(run_dir: Path, keep: int) -> list[Path]:
    """Deletes all but the `keep` latest ema-<step>.pt in run_dir (latest by step, also past the padding's
    7 digits); returns the ones kept, oldest first. keep >= 1."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    snapshots = sorted((p for p in run_dir.glob(f"{SNAPSHOT_PREFIX}*.pt") if snapshot_step(p) is not None),
                       key=snapshot_step)
    for old in snapshots[:-keep]:
        old.unlink()
    return snapshots[-keep:]


@contextmanager
def _one_line_write_errors(path: Path):
    """A full disk (or any OSError) while writing a record is one UserError line naming the file."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {str(path)!r} ({err.strerror or err})") from None


def agree(flag: bool, ctx, device: torch.device) -> bool:
    """Rank 0's decision, known to every rank (a no-op single-process)."""
    return distributed.broadcast_flag(flag, ctx, device)
