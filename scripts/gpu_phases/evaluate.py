"""Phase evaluate: stage5_guidance/evaluate.py on the trained run at w = 1 and w = 3, and guide.py's digit grid.

Measures: judge accuracy (per class and mean), FD and its real-vs-real floor on the held-out digits at
1,000 samples (DDIM-50), and sampling images/s inside evaluate.py. Writes: results["evaluate"] (each
run's results.json, into quality.json) and digit_grid.png (w = 3, one row per class).
"""
from __future__ import annotations

import json
import shutil

from gpu_phases.common import PhaseSkipped, Recorder, Settings, check, left, only_run_dir

EVAL_PER_CLASS = 100   # 10 classes × 100 = 1,000 samples per evaluation run
#: Of the time left, w = 1 may use half; w = 3 (two forward passes per step) 1/1.3, leaving the grid the rest.
SHARE_DIVISOR = {"1": 2, "3": 1.3}


def evaluate_at(s: Settings, rec: Recorder, deadline: float, run_dir: str, w: str) -> dict:
    """One evaluate.py run at guidance scale w; returns its results.json."""
    sizes = ["--per-class", "1", "--classifier-epochs", "1", "--heldout", "500", "--runs", "ddim:3"] if s.dry_run \
        else ["--per-class", str(EVAL_PER_CLASS), "--runs", "ddim:50", "--batch-size", "1000"]
    out = s.work / f"evaluate-w{w}"
    cmd = [s.python, "stage5_guidance/evaluate.py", "--checkpoint", run_dir, "--data-dir", str(s.mnist),
           "--classifier", str(s.work / "classifier.pt"), "--guidance-scale", w, "--out", str(out),
           "--device", s.device, "--no-progress", *sizes]
    check(rec.run(cmd, left(deadline) / SHARE_DIVISOR[w]), f"evaluate w={w}")
    return json.loads((only_run_dir(out) / "results.json").read_text())


def digit_grid(s: Settings, rec: Recorder, deadline: float, run_dir: str) -> None:
    """guide.py --grid at w = 3 (DDIM-50, ten seeds per class), copied to digit_grid.png."""
    cmd = [s.python, "stage5_guidance/guide.py", "--checkpoint", run_dir, "--grid", "--n", "1" if s.dry_run else "10",
           "--steps", "3" if s.dry_run else "50", "--guidance-scale", "3", "--out", str(s.work / "grid"),
           "--device", s.device, "--no-progress"]
    check(rec.run(cmd, left(deadline)), "digit grid")
    pngs = sorted((s.work / "grid").rglob("*.png"))
    if pngs:
        shutil.copy(pngs[0], s.out / "digit_grid.png")


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """Evaluates the train phase's run at w = 1 and w = 3, then draws the digit grid."""
    run_dir = results.get("run_dir")
    if run_dir is None:
        raise PhaseSkipped("no trained run to evaluate (the train phase failed)")
    results["evaluate"] = {f"w{w}": evaluate_at(s, rec, deadline, run_dir, w) for w in ("1", "3")}
    digit_grid(s, rec, deadline, run_dir)
