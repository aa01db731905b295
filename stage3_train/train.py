"""Stage 3: train a DDPM noise predictor ε_θ(x_t, t[, y]) with L_simple.

    python stage3_train/train.py --dataset mnist                       # GPU: the mnist preset; CPU: a CPU recipe
    python stage3_train/train.py --dataset mnist --data-dir ../shared/data/mnist --preset tiny --max-steps 200
    torchrun --nproc_per_node=2 stage3_train/train.py --dataset mnist  # DistributedDataParallel

Each run writes runs/NNNNN-<dataset>-<preset>-<precision>/ (options.json, log.csv, loss.png, sample
grids from the EMA weights, last.pt / best.pt / ema.pt). The flags are shared.training.config.TrainConfig's
fields; the training itself is shared.training.loop.train, which builds a Trainer and runs it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from shared import flags  # noqa: E402
from shared.records.checkpoint import LAST_NAME, load_checkpoint, resolve_checkpoint  # noqa: E402
from shared.training.config import (DEFAULT_MAX_STEPS, apply_cpu_recipe, check_config,  # noqa: E402
                                    merge_resume_options, parse_config, resolve_precision)
from shared.training.loop import train  # noqa: E402
from shared.training.signals import Interrupted  # noqa: E402


def main(argv: Sequence[str] | None = None):
    cfg, given, dry_run = parse_config(argv, __doc__)
    check_config(cfg)
    device = flags.pick_device(cfg.device)
    cfg, note = apply_cpu_recipe(cfg, given, device)
    if dry_run:
        if cfg.resume is not None:  # show what the resumed run would use
            path = resolve_checkpoint(cfg.resume, prefer=(LAST_NAME,))
            cfg = merge_resume_options(cfg, load_checkpoint(path).get("options", {}), str(path), given)
        resolved = asdict(cfg)
        resolved["precision"] = resolve_precision(cfg.precision, device)
        if cfg.epochs is None and cfg.max_steps is None:
            resolved["max_steps"] = DEFAULT_MAX_STEPS
        print(json.dumps(resolved, indent=2))
        return None
    try:
        result = train(cfg, given=given, note=note)
    except Interrupted as stopped:  # SIGINT/SIGTERM: last.pt written; one line, exit 130/143
        print(f"interrupted: {stopped}", file=sys.stderr)
        sys.exit(stopped.exit_code)
    if result.run_dir is not None:  # rank 0: the one summary line block on stdout
        p = result.progress
        best = f"{p.best_heldout:.5f}" if p.best_heldout != float("inf") else "n/a"
        print(f"done: {p.step} steps ({result.epochs_done:.2f} epochs, {p.images_seen:,} images) in {result.run_dir}\n"
              f"  final loss {result.final_loss:.5f}, best held-out loss (EMA) {best}, "
              f"skipped steps {p.skipped_total}{', stopped early' if result.stopped_early else ''}"
              f"{f', --minutes {cfg.minutes:g} spent (resume with --resume to go on)' if result.out_of_time else ''}\n"
              f"  throughput {result.images_per_s:.1f} images/s (training steps only)")
    return result


if __name__ == "__main__":
    flags.run_main(main)
