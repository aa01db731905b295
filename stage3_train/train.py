"""Stage 3: train a DDPM noise predictor ε_θ(x_t, t[, y]) with L_simple.

    python stage3_train/train.py --dataset mnist                       # the mnist preset, GPU: minutes
    python stage3_train/train.py --dataset mnist --data-dir ../shared/data/mnist --preset tiny --max-steps 200
    torchrun --nproc_per_node=2 stage3_train/train.py --dataset mnist  # DistributedDataParallel

Each run writes runs/NNNNN-<dataset>-<preset>-<precision>/ (options.json, log.csv, loss.png, sample
grids from the EMA weights, last.pt / best.pt / ema.pt). The training itself is shared.training.loop.train.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from shared.interface import cli  # noqa: E402
from shared.records.checkpoint import LAST_NAME, load_checkpoint, resolve_checkpoint  # noqa: E402
from shared.model.precision import TRAIN_PRECISIONS as PRECISIONS  # noqa: E402
from shared.training.loop import (DEFAULT_MAX_STEPS, TrainConfig, merge_resume_options,  # noqa: E402
                             resolve_precision, train)
from shared.model.unet import PRESETS  # noqa: E402

D = TrainConfig()  # the defaults live in one place; --help shows them


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__)
    g = p.add_argument_group("data and model")
    cli.add_dataset_args(g, default=D.dataset)
    g.add_argument("--preset", choices=tuple(PRESETS), default=D.preset, help="U-Net size (tiny for tests and CPUs)")
    cli.add_schedule_args(g)
    g.add_argument("--class-cond", action="store_true", help="condition on labels, for classifier-free guidance")
    g.add_argument("--p-uncond", type=cli.float_in(0.0, 1.0), default=D.p_uncond,
                   help="with --class-cond: probability that a label is replaced by the null class")
    g.add_argument("--heldout-size", type=cli.nonneg_int, default=D.heldout_size,
                   help="images held out for the denoising loss with fixed t and ε (0: no evaluation)")

    g = p.add_argument_group("length and batch")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=cli.positive_int, default=None, help="train this many epochs")
    length.add_argument("--max-steps", type=cli.positive_int, default=None,
                        help=f"train this many steps (default {DEFAULT_MAX_STEPS} when --epochs is not given)")
    g.add_argument("--batch-size", type=cli.positive_int, default=D.batch_size, help="images per step per process")
    g.add_argument("--num-workers", type=cli.nonneg_int, default=D.num_workers,
                   help="DataLoader workers (0 reads in the main process; MNIST is in memory anyway)")
    g.add_argument("--seed", type=cli.nonneg_int, default=D.seed, help="seed of weights, data order and noise")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=cli.positive_float, default=D.lr, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=cli.nonneg_float, default=D.weight_decay, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=cli.nonneg_int, default=D.warmup_steps, help="linear LR warm-up")
    g.add_argument("--cosine", action="store_true", help="cosine-decay the LR to 0 after the warm-up")
    g.add_argument("--grad-clip", type=cli.nonneg_float, default=D.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--ema-decay", type=cli.float_in(0.0, 1.0), default=D.ema_decay, help="EMA decay")
    g.add_argument("--ema-warmup", type=cli.nonneg_int, default=D.ema_warmup,
                   help="EMA decay warm-up: decay_n = min(decay, (1+n)/(warmup+n)); 0: off")
    g.add_argument("--precision", choices=PRECISIONS, default=D.precision,
                   help="autocast dtype; auto = bf16 on a CUDA GPU that has it, else fp32; fp16 uses a GradScaler")
    g.add_argument("--max-consecutive-skips", type=cli.positive_int, default=D.max_consecutive_skips,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")

    g = p.add_argument_group("records")
    g.add_argument("--out", default=D.out, help="parent of the auto-numbered run directories")
    g.add_argument("--log-every", type=cli.positive_int, default=D.log_every, help="steps per log.csv row")
    g.add_argument("--eval-every", type=cli.positive_int, default=D.eval_every, help="steps per held-out evaluation")
    g.add_argument("--sample-every", type=cli.positive_int, default=D.sample_every, help="steps per sample grid")
    g.add_argument("--sample-steps", type=cli.positive_int, default=D.sample_steps,
                   help="DDIM steps of the sample grids (EMA weights)")
    g.add_argument("--ckpt-every", type=cli.positive_int, default=D.ckpt_every, help="steps per last.pt/ema.pt")
    g.add_argument("--early-stop-patience", type=cli.nonneg_int, default=D.early_stop_patience,
                   help="stop after this many evaluations without a better held-out loss (0: never)")
    g.add_argument("--resume", default=None, help="continue a run: its directory or a last.pt/best.pt")

    g = p.add_argument_group("speed")
    g.add_argument("--device", default=D.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--fused-kernels", action="store_true", help="use the fused Triton kernels (fails if unavailable)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--dry-run", action="store_true", help="print the resolved options and exit")
    return p


def given_options(argv: Sequence[str] | None) -> set[str]:
    """Names of the options set on the command line (a resumed run takes the others from its checkpoint)."""
    unset = object()
    probe = build_parser()
    probe.set_defaults(**{action.dest: unset for action in probe._actions if action.dest != "help"})
    return {name for name, value in vars(probe.parse_args(argv)).items() if value is not unset}


def main(argv: Sequence[str] | None = None):
    args = vars(build_parser().parse_args(argv))
    dry_run = args.pop("dry_run")
    cfg = TrainConfig(**args)
    if dry_run:
        if cfg.resume is not None:  # show what the resumed run would use
            path = resolve_checkpoint(cfg.resume, prefer=(LAST_NAME,))
            cfg = merge_resume_options(cfg, load_checkpoint(path).get("options", {}), str(path),
                                       given_options(argv))
        resolved = asdict(cfg)
        resolved["precision"] = resolve_precision(cfg.precision, cli.pick_device(cfg.device))
        if cfg.epochs is None and cfg.max_steps is None:
            resolved["max_steps"] = DEFAULT_MAX_STEPS
        print(json.dumps(resolved, indent=2))
        return None
    result = train(cfg, given=given_options(argv))
    if result.run_dir is not None:  # rank 0: the one summary line block on stdout
        p = result.progress
        best = f"{p.best_heldout:.5f}" if p.best_heldout != float("inf") else "n/a"
        print(f"done: {p.step} steps ({result.epochs_done:.2f} epochs, {p.images_seen:,} images) in {result.run_dir}\n"
              f"  final loss {result.final_loss:.5f}, best held-out loss (EMA) {best}, "
              f"skipped steps {p.skipped_total}{', stopped early' if result.stopped_early else ''}\n"
              f"  throughput {result.images_per_s:.1f} images/s (training steps only)")
    return result


if __name__ == "__main__":
    cli.run_main(main)
