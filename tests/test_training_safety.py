"""Nothing lost, nothing crashes: a diverging run never checkpoints diverged weights, signals save and
resume exactly, a full disk is one line, stale temporary files go, a run never nests in a run, ema.pt is
never older than last.pt, bad labels and damaged records are refused, the evaluator's images stay out."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import shared.records.checkpoint as checkpoint_module
import shared.training.recorder as recorder_module
from shared.errors import UserError
from shared.records.checkpoint import EMA_NAME, LAST_NAME, atomic_save, load_checkpoint, load_for_sampling
from shared.records.runs import read_log
from shared.training.config import TrainConfig
from shared.data.datasets import DataError, load_dataset, without_judge_heldout
from shared.training.loop import train
from shared.training.signals import Interrupted
from tests.idx_files import write_idx
from tests.stage3_helpers import (FAST_ARGS, TRAIN_SCRIPT, edge_bar_dataset, one_thread,  # noqa: F401 (autouse)
                                  single_thread_env, write_edge_bar_idx)


def cfg_for(tmp_path, **overrides) -> TrainConfig:
    base = dict(preset="tiny", timesteps=50, batch_size=8, heldout_size=16, max_steps=10, log_every=1,
                eval_every=10_000, sample_every=10_000, ckpt_every=10_000, sample_steps=2, lr=1e-3,
                warmup_steps=2, device="cpu", precision="fp32", judge_heldout=0, out=str(tmp_path / "runs"))
    base.update(overrides)
    return TrainConfig(**base)


def only_run(out) -> "os.PathLike":
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


class Items(Dataset):
    """A dataset served item by item (the DataLoader path), optionally sending `signum` to this process
    on read number `signal_at`."""

    def __init__(self, base, signal_at: int | None = None, signum: int = signal.SIGINT):
        self.base, self.info, self.signal_at, self.signum, self.reads = base, base.info, signal_at, signum, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.signal_at:
            os.kill(os.getpid(), self.signum)
        return self.base[i]


def test_diverging_run_keeps_no_diverged_checkpoint(tmp_path):
    """lr 1e6: the steps turn non-finite; no last.pt/ema.pt is written during the run of skips, and the
    error names the last finite checkpoint (or says there is none)."""
    with pytest.raises(UserError, match="consecutive steps had a non-finite") as info:
        train(cfg_for(tmp_path, lr=1e6, max_steps=60, ckpt_every=5, max_consecutive_skips=5, warmup_steps=0),
              edge_bar_dataset(128))
    run = only_run(tmp_path / "runs")
    rows = read_log(run / "log.csv")
    first_skip = next(int(r["step"]) for r in rows if int(r["skipped"]) > 0)
    if (run / LAST_NAME).exists():
        ckpt = load_checkpoint(run / LAST_NAME)
        assert ckpt["progress"]["step"] < first_skip and ckpt["progress"]["consecutive_skips"] == 0
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
        assert f"from step {ckpt['progress']['step']}" in str(info.value)
        assert load_checkpoint(run / EMA_NAME)["meta"]["step"] == ckpt["progress"]["step"]
    else:
        assert "no checkpoint was written" in str(info.value) and not (run / EMA_NAME).exists()


def test_sigint_finishes_the_step_saves_and_resumes_exactly(tmp_path):
    data = edge_bar_dataset(96)
    full = train(cfg_for(tmp_path / "full", max_steps=10), Items(data))
    # reads: 16 held-out images, then 8 per step; the signal arrives while step 6's batch is read
    with pytest.raises(Interrupted) as info:
        train(cfg_for(tmp_path / "cut", max_steps=10), Items(data, signal_at=16 + 8 * 5 + 3))
    assert info.value.exit_code == 130 and "SIGINT" in str(info.value)
    cut = only_run(tmp_path / "cut" / "runs")
    assert load_checkpoint(cut / LAST_NAME)["progress"]["step"] == 6
    assert "last.pt at step 6" in str(info.value)
    resumed = train(cfg_for(tmp_path / "cut", max_steps=10, resume=str(cut)), Items(data),
                    given={"max_steps", "resume", "device"})
    full_rows = {int(r["step"]): r for r in read_log(full.run_dir / "log.csv")}
    resumed_rows = {int(r["step"]): r for r in read_log(resumed.run_dir / "log.csv")}
    assert sorted(resumed_rows) == list(range(1, 11))
    for step in range(7, 11):
        for column in ("loss", "lr", "grad_norm", "skipped"):
            assert resumed_rows[step][column] == full_rows[step][column], (step, column)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_sigterm_in_a_real_process_exits_143_with_one_line(tmp_path):
    data = write_edge_bar_idx(tmp_path / "data", n=64)
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--data-dir", str(data), "--out", str(out),
                             "--max-steps", "100000", "--log-every", "1", "--judge-heldout", "0", *FAST_ARGS],
                            cwd=tmp_path, env=single_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    try:
        while len(list(out.glob("*/log.csv"))) == 0 or len(read_log(next(out.glob("*/log.csv")))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    last_line = stderr.rstrip("\n").split("\n")[-1]
    assert last_line.startswith("interrupted: SIGTERM: stopped after step "), stderr[-500:]
    step = int(last_line.split("stopped after step ")[1].split(";")[0])
    run = only_run(out)
    assert load_checkpoint(run / LAST_NAME)["progress"]["step"] == step
    assert load_checkpoint(run / EMA_NAME)["meta"]["step"] == step
    assert not list(run.glob(".*tmp*"))


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path):
    first = train(cfg_for(tmp_path, max_steps=2), edge_bar_dataset(64))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = first.run_dir / f".{LAST_NAME}.tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_progress = first.run_dir / f".{LAST_NAME}.tmp-{writer.pid}"  # a live process may still be writing
        in_progress.write_bytes(b"being written")
        train(cfg_for(tmp_path, max_steps=3, resume=str(first.run_dir)), edge_bar_dataset(64), given={"max_steps"})
        assert not stale.exists()
        assert in_progress.exists()
    finally:
        writer.kill()
        writer.wait()


def test_full_disk_is_one_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the disk first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_fail)
    with pytest.raises(UserError, match="No space left on device") as info:
        train(cfg_for(tmp_path, max_steps=2), edge_bar_dataset(64))
    assert "\n" not in str(info.value)
    run = only_run(tmp_path / "runs")
    assert not list(run.glob("*.pt")) and not list(run.glob(".*tmp*"))


def test_out_pointing_at_a_run_directory_is_refused(tmp_path):
    first = train(cfg_for(tmp_path, max_steps=2), edge_bar_dataset(64))
    before = sorted(p.name for p in first.run_dir.iterdir())
    with pytest.raises(UserError, match="is a run directory"):
        train(cfg_for(tmp_path, max_steps=2, out=str(first.run_dir)), edge_bar_dataset(64))
    assert sorted(p.name for p in first.run_dir.iterdir()) == before


def test_ema_is_written_before_last_and_records_its_step(tmp_path, monkeypatch):
    order = []
    real = recorder_module.atomic_save
    monkeypatch.setattr(recorder_module, "atomic_save", lambda obj, path: order.append(path.name) or real(obj, path))
    result = train(cfg_for(tmp_path, max_steps=4, ckpt_every=2), edge_bar_dataset(64))
    assert [name for name in order if name != "best.pt"] == [EMA_NAME, LAST_NAME, EMA_NAME, LAST_NAME]
    assert load_checkpoint(result.run_dir / EMA_NAME)["meta"]["step"] == 4


@pytest.mark.parametrize("bad_label", [10, 12, 255])
def test_labels_outside_the_classes_are_refused_on_load(tmp_path, bad_label):
    labels = (np.arange(20) % 10).astype(np.uint8)
    labels[7] = bad_label
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((20, 28, 28), np.uint8), gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=True)
    with pytest.raises(DataError, match=f"holds label {bad_label}, outside the 10 classes"):
        load_dataset("mnist", str(tmp_path))


def test_damaged_schedule_and_options_in_a_checkpoint_are_one_line(tmp_path):
    result = train(cfg_for(tmp_path, max_steps=2), edge_bar_dataset(64))
    ema = load_checkpoint(result.run_dir / EMA_NAME)
    ema["schedule"]["num_timesteps"] = "abc"
    (tmp_path / "bad_schedule").mkdir()
    atomic_save(ema, tmp_path / "bad_schedule" / EMA_NAME)
    with pytest.raises(UserError, match="damaged schedule record"):
        load_for_sampling(tmp_path / "bad_schedule", "cpu")
    last = load_checkpoint(result.run_dir / LAST_NAME)
    last["options"]["timesteps"] = "abc"
    atomic_save(last, tmp_path / "bad_options.pt")
    with pytest.raises(UserError, match="holds a bad option: timesteps must be an integer"):
        train(cfg_for(tmp_path, resume=str(tmp_path / "bad_options.pt")), edge_bar_dataset(64), given=set())


def test_the_evaluators_heldout_images_are_left_out_of_training(tmp_path):
    """A labelled in-memory dataset larger than judge_heldout trains on all but its last judge_heldout
    images (shared.data.datasets.judge_split), and options.json says how many were left out."""
    data = edge_bar_dataset(96)
    kept, excluded = without_judge_heldout(data, 40)
    assert excluded == 40 and len(kept) == 56 and torch.equal(kept.images, data.images[:56])
    assert without_judge_heldout(data, 200) == (data, 0)  # too small to share with the evaluator
    result = train(cfg_for(tmp_path, judge_heldout=40, max_steps=2), data)
    options = json.loads((result.run_dir / "options.json").read_text())["options"]
    assert options["judge_heldout_excluded"] == 40 and options["judge_heldout"] == 40
    assert math.isfinite(result.final_loss)
