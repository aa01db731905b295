"""Phase train: the main job as a user runs it, stage3_train/train.py --dataset mnist (the mnist preset,
class-conditional, bf16), stopped by SIGINT when its time share is spent (it then writes last.pt).

Measures: steps reached, the last logged images/s, the last loss. Writes: results["train"] (into
quality.json) and results["run_dir"], the run the evaluate and sampling phases use. Under --dry-run: a
4-step tiny run to completion.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

from gpu_phases.common import Recorder, Settings, check, last_images_per_s, left, only_run_dir, read_log_rows

#: Time a SIGINT'd training run gets to finish its step and write last.pt before it is killed.
TRAIN_STOP_GRACE_S = 15
#: Flags of a run that only the time share stops: no sample grids, a checkpoint and evaluation every 500 steps.
UNTIL_STOPPED = ["--max-steps", "100000", "--sample-every", "100000", "--ckpt-every", "500",
                 "--eval-every", "500", "--log-every", "50"]
STOPPED_OK = (0, 124, 130)   # finished, stopped at the limit, or stopped by SIGINT


def train_cmd(s: Settings, out: Path, extra: list[str]) -> list[str]:
    """train.py on MNIST, class-conditional, seed 0: the mnist preset in bf16, or tiny sizes under --dry-run."""
    cmd = [s.python, "stage3_train/train.py", "--dataset", "mnist", "--data-dir", str(s.mnist), "--out", str(out),
           "--class-cond", "--device", s.device, "--seed", "0"]
    if s.dry_run:
        cmd += ["--preset", "tiny", "--batch-size", "8", "--heldout-size", "16", "--sample-steps", "3",
                "--eval-every", "2", "--ckpt-every", "2", "--precision", "fp32"]
    else:
        cmd += ["--preset", "mnist", "--precision", "bf16"]
    return cmd + extra


def graph_flags(rec: Recorder, results: dict) -> list[str]:
    """[] (train.py's default: the step as a CUDA graph), or --no-cuda-graphs when the kernel-tests phase
    found the graphed step failing its tests, so the main job still trains (and the log says why)."""
    if results.get("cuda_graph_tests", {}).get("ok", True):
        return []
    rec.log("train: --no-cuda-graphs, since the graphed-step tests failed: "
            + str(results["cuda_graph_tests"]["detail"]))
    return ["--no-cuda-graphs"]


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """Trains until the share is spent (GPU) or for 4 steps (--dry-run), then reads the run's log.csv."""
    out = s.work / "train"
    if s.dry_run:
        check(rec.run(train_cmd(s, out, ["--max-steps", "4"]), left(deadline)), "train")
    else:
        rc = rec.run(train_cmd(s, out, UNTIL_STOPPED + graph_flags(rec, results)), left(deadline) - TRAIN_STOP_GRACE_S,
                     stop_signal=signal.SIGINT, grace_s=TRAIN_STOP_GRACE_S)
        if rc not in STOPPED_OK:
            check(rc, "train")
    run_dir = only_run_dir(out)
    last_row = read_log_rows(run_dir)[-1]
    options_file = run_dir / "options.json"
    options = json.loads(options_file.read_text())["options"] if options_file.is_file() else {}
    results["train"] = {"run_dir": run_dir.name, "steps": int(last_row["step"]),
                        "cuda_graphs": options.get("cuda_graphs_used"),
                        "images_per_s": last_images_per_s(run_dir), "final_loss": last_row.get("loss")}
    results["run_dir"] = str(run_dir)
