"""Kill-and-resume: a run killed with SIGKILL after a checkpoint, then resumed, repeats an uninterrupted
run's per-step losses exactly from that step on (CPU, fixed seed), and ends with identical weights."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch

from shared.records.checkpoint import LAST_NAME, load_checkpoint
from shared.records.runs import read_log
from tests.stage3_helpers import FAST_ARGS, TRAIN_SCRIPT, run_train, single_thread_env, write_edge_bar_idx

STEPS = 36          # long enough that the killed run cannot finish between its first checkpoint and the kill
CKPT_EVERY = 6
# 128 images − 16 held out = 112 = 14 batches of 8 per epoch, so the runs cross epoch boundaries.
COMPARED = ("epoch", "loss", "heldout_loss", "lr", "grad_norm", "skipped")
POLL_S = 0.005
KILL_DEADLINE_S = 90


def _args(data, out):
    return ["--dataset", "mnist", "--data-dir", str(data), "--out", str(out), "--max-steps", str(STEPS),
            "--ckpt-every", str(CKPT_EVERY), "--eval-every", str(CKPT_EVERY), "--log-every", "1",
            "--sample-every", "1000", "--class-cond", "--seed", "7", *FAST_ARGS]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    data = write_edge_bar_idx(tmp_path / "data", n=128)
    full = run_train(_args(data, tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    full_dir = next((tmp_path / "full").iterdir())

    # The run to kill: SIGKILL as soon as its first last.pt appears.
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *_args(data, killed_out)], cwd=tmp_path,
                            env=single_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_DEADLINE_S
    try:
        while not list(killed_out.glob(f"*/{LAST_NAME}")):
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(POLL_S)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_dir = next(killed_out.iterdir())
    resumed_from = load_checkpoint(killed_dir / LAST_NAME)["progress"]["step"]
    assert 0 < resumed_from < STEPS and resumed_from % CKPT_EVERY == 0

    resumed = run_train(["--resume", str(killed_dir), "--out", str(killed_out), "--device", "cpu"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    resumed_dir = sorted(killed_out.iterdir())[-1]
    assert resumed_dir != killed_dir  # a resumed run gets its own directory; the killed one is left alone

    full_rows = {int(r["step"]): r for r in read_log(full_dir / "log.csv")}
    resumed_rows = {int(r["step"]): r for r in read_log(resumed_dir / "log.csv")}
    assert sorted(resumed_rows) == list(range(1, STEPS + 1))  # earlier rows carried over from the killed run
    for step in range(resumed_from + 1, STEPS + 1):
        for column in COMPARED:
            assert resumed_rows[step][column] == full_rows[step][column], (step, column)
    full_ckpt, resumed_ckpt = load_checkpoint(full_dir / LAST_NAME), load_checkpoint(resumed_dir / LAST_NAME)
    for key, value in full_ckpt["model"].items():
        assert torch.equal(resumed_ckpt["model"][key], value), key
    for key, value in full_ckpt["ema"].items():
        assert torch.equal(resumed_ckpt["ema"][key], value), key
