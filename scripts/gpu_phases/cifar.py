"""Phase cifar10: CIFAR-10 end to end: stage3_train/train.py --dataset cifar10 with the CIFAR-10 GPU recipe
for its part of the share (--minutes), then stage5_guidance/evaluate.py at w = 1 and w = 3 (DDIM-50).

Measures: training steps and images/s; the CIFAR judge's accuracy on the 10,000-image test split (the
ResNet of shared.evaluation.classifier, trained here on the train zip, then loaded for w = 3); per w the
judge's accuracy on 1,000 guided samples, the FD on its features beside the floor (train vs test real
images), and sampling images/s. The FID (Inception) is left out (--no-inception-fid): the GPU machine has
no Inception weights. Writes: results["cifar10"] (into quality.json). Skips when no CIFAR-10 folder was
given (--cifar). Under --dry-run: the same commands on the CPU at tiny sizes, on zips of the first
DRY_PER_CLASS images per class of the given ones (the real reader on real JPEGs, in seconds).
"""
from __future__ import annotations

import json
import signal
import zipfile
from pathlib import Path

from gpu_phases.common import (PhaseSkipped, Recorder, Settings, check, last_images_per_s, left, only_run_dir,
                               read_log_rows)
from gpu_phases.train import STOPPED_OK, TRAIN_STOP_GRACE_S, graph_flags

#: The CIFAR-10 GPU recipe (stage3_train/README.md): the mnist preset's U-Net at 32×32×3 (7 M parameters;
#: the cifar10 preset's 36 M learn less in a minute), batch 256, a high lr and min-SNR-γ weights for a
#: short run, bf16. Flips are on by default for cifar10.
GPU_RECIPE = ["--preset", "mnist", "--batch-size", "256", "--lr", "1e-3", "--min-snr-gamma", "2", "--precision", "bf16"]
DRY_RECIPE = ["--preset", "tiny", "--batch-size", "8", "--heldout-size", "16", "--sample-steps", "3",
              "--precision", "fp32", "--max-steps", "3"]
#: Records of a run that --minutes stops: no grids before the end, no mid-run checkpoints.
UNTIL_BUDGET = ["--max-steps", "100000", "--sample-every", "100000", "--ckpt-every", "100000",
                "--eval-every", "100000", "--log-every", "25"]
TRAIN_FRACTION = 0.5      # of the share: training; the rest is the two evaluations
START_UP_S = 15           # of the training part, before --minutes counts: imports, decoding the train zip
#: Of the time left after training, w = 1 may use this part: it trains the judge (about 1,600 steps), which
#: w = 3 then loads.
FIRST_EVAL_FRACTION = 0.6
EVAL_PER_CLASS = 100      # 10 classes × 100 = 1,000 samples per evaluation
DRY_PER_CLASS = {"train": 30, "test": 10}
SUMMARY = ("classifier_accuracy", "heldout_images")
RUN_SUMMARY = ("mean_class_accuracy", "per_class_accuracy", "frechet_distance", "real_floor", "inception_score",
               "images_per_s", "num_samples")


def dry_run_copy(source: Path, work: Path) -> Path:
    """work/cifar-dry/ with cifar10-<split>.zip holding the first DRY_PER_CLASS[split] members of each class
    folder of source's zips (member names and bytes as they are)."""
    target = work / "cifar-dry"
    target.mkdir(parents=True, exist_ok=True)
    for split, per_class in DRY_PER_CLASS.items():
        name = f"cifar10-{split}.zip"
        with zipfile.ZipFile(source / name) as src, zipfile.ZipFile(target / name, "w") as dst:
            taken: dict[str, int] = {}
            for member in sorted(src.namelist()):
                folder = member.rsplit("/", 1)[0]
                if taken.get(folder, 0) < per_class:
                    taken[folder] = taken.get(folder, 0) + 1
                    dst.writestr(member, src.read(member))
    return target


def train_cmd(s: Settings, data: Path, out: Path, budget_s: float) -> list[str]:
    """train.py --dataset cifar10 on data: the GPU recipe for budget_s seconds, or the dry-run sizes."""
    cmd = [s.python, "stage3_train/train.py", "--dataset", "cifar10", "--data-dir", str(data), "--out", str(out),
           "--device", s.device, "--seed", "0"]
    if s.dry_run:
        return cmd + DRY_RECIPE
    return cmd + GPU_RECIPE + UNTIL_BUDGET + ["--minutes", f"{max(budget_s, 1.0) / 60:.3f}"]


def evaluate_at(s: Settings, rec: Recorder, limit_s: float, data: Path, run_dir: str, w: str) -> dict:
    """evaluate.py on the CIFAR-10 run at guidance scale w, judged on data; the figures of its results.json."""
    sizes = ["--per-class", "1", "--classifier-epochs", "1", "--runs", "ddim:3"] if s.dry_run \
        else ["--per-class", str(EVAL_PER_CLASS), "--runs", "ddim:50", "--batch-size", "1000", "--precision", "bf16"]
    out = s.work / f"cifar-evaluate-w{w}"
    cmd = [s.python, "stage5_guidance/evaluate.py", "--checkpoint", run_dir, "--dataset", "cifar10",
           "--data-dir", str(data), "--classifier", str(s.work / "cifar-classifier.pt"), "--no-inception-fid",
           "--guidance-scale", w, "--out", str(out), "--device", s.device, "--no-progress", *sizes]
    check(rec.run(cmd, limit_s), f"cifar10 evaluate w={w}")
    report = json.loads((only_run_dir(out) / "results.json").read_text())
    return {**{k: report[k] for k in SUMMARY}, **{k: report["runs"][0].get(k) for k in RUN_SUMMARY}}


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """Trains for TRAIN_FRACTION of the share (--minutes stops it, leaving the final records the grace
    time; SIGINT then SIGKILL are the backstop), then evaluates at w = 1 and w = 3."""
    if s.cifar is None or not s.cifar.is_dir():
        raise PhaseSkipped(f"no CIFAR-10 folder (--cifar {s.cifar})")
    data = dry_run_copy(s.cifar, s.work) if s.dry_run else s.cifar
    out = s.work / "cifar-train"
    train_s = TRAIN_FRACTION * left(deadline)
    cmd = train_cmd(s, data, out, train_s - START_UP_S - TRAIN_STOP_GRACE_S) + graph_flags(rec, results)
    rc = rec.run(cmd, train_s - TRAIN_STOP_GRACE_S, stop_signal=signal.SIGINT, grace_s=TRAIN_STOP_GRACE_S)
    if rc not in STOPPED_OK:
        check(rc, "cifar10 train")
    run_dir = only_run_dir(out)
    last_row = read_log_rows(run_dir)[-1]
    figures = {"train": {"run_dir": run_dir.name, "steps": int(last_row["step"]),
                         "images_per_s": last_images_per_s(run_dir), "final_loss": last_row.get("loss")}}
    figures["w1"] = evaluate_at(s, rec, FIRST_EVAL_FRACTION * left(deadline), data, str(run_dir), "1")
    figures["w3"] = evaluate_at(s, rec, left(deadline), data, str(run_dir), "3")
    results["cifar10"] = figures
