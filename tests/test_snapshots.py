"""--keep-snapshots K: beside ema.pt, each last.pt leaves ema-<step>.pt, and only the latest K by step stay.
Each is the EMA of its step (against runs stopped at that step), loads in stage4_sampling/sample.py, and a
resumed run keeps its own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.records.checkpoint import EMA_NAME, load_checkpoint
from shared.training.config import TrainConfig
from shared.training.loop import train
from shared.training.recorder import prune_snapshots, snapshot_name
from tests.stage3_helpers import REPO, edge_bar_dataset, one_thread  # noqa: F401 (autouse fixture)
from tests.scripts import load_script
from tests.test_stage4_5_scripts import _only_dir


def _cfg(tmp_path, name: str, **overrides) -> TrainConfig:
    base = dict(preset="tiny", timesteps=50, batch_size=4, heldout_size=8, judge_heldout=0, log_every=5,
                eval_every=10_000, sample_every=10_000, sample_steps=2, device="cpu", precision="fp32",
                out=str(tmp_path / name), seed=11, ckpt_every=2, keep_snapshots=3)
    return TrainConfig(**{**base, **overrides})


def _snapshots(run) -> list[str]:
    return sorted(p.name for p in run.glob("ema-*.pt"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_three_snapshots_are_the_ema_at_their_steps(tmp_path):
    """--ckpt-every 2 --max-steps 10 --keep-snapshots 3: ema-0000006/8/10.pt remain; 10 is ema.pt, and 6
    and 8 are the ema.pt of the same run stopped after 6 and 8 steps (and differ from each other)."""
    data = edge_bar_dataset(80)
    run = train(_cfg(tmp_path, "runs", max_steps=10), data).run_dir
    assert _snapshots(run) == ["ema-0000006.pt", "ema-0000008.pt", "ema-0000010.pt"]
    ema = load_checkpoint(run / EMA_NAME)
    last = load_checkpoint(run / snapshot_name(10))
    assert _same_weights(last["state_dict"], ema["state_dict"]) and last["meta"]["step"] == 10
    kept = {}
    for step in (6, 8):
        snap = load_checkpoint(run / snapshot_name(step))
        assert snap["meta"]["step"] == step and snap["model_config"] == ema["model_config"]
        stopped = train(_cfg(tmp_path, f"stop{step}", max_steps=step, keep_snapshots=0), data).run_dir
        assert _same_weights(snap["state_dict"], load_checkpoint(stopped / EMA_NAME)["state_dict"]), step
        kept[step] = snap["state_dict"]
    assert not _same_weights(kept[6], kept[8]) and not _same_weights(kept[8], ema["state_dict"])


def test_a_snapshot_samples_in_sample_py_like_ema_pt(tmp_path):
    """stage4_sampling/sample.py reads ema-<step>.pt as it reads ema.pt: the same seeds give the same images."""
    run = train(_cfg(tmp_path, "runs", max_steps=4, keep_snapshots=1), edge_bar_dataset(80)).run_dir
    assert _snapshots(run) == ["ema-0000004.pt"]
    sample = load_script(REPO / "stage4_sampling" / "sample.py")
    images = []
    for name, ckpt in (("snap", run / snapshot_name(4)), ("ema", run / EMA_NAME)):
        sample.main(["--checkpoint", str(ckpt), "--n", "4", "--sampler", "ddim", "--steps", "3", "--device", "cpu",
                     "--out", str(tmp_path / name), "--no-progress"])
        with np.load(_only_dir(tmp_path / name) / "samples.npz") as npz:
            images.append(npz["images"])
    assert images[0].shape == (4, 8, 8, 1) and np.array_equal(images[0], images[1])


def test_zero_keeps_no_snapshot(tmp_path):
    run = train(_cfg(tmp_path, "runs", max_steps=4, keep_snapshots=0), edge_bar_dataset(80)).run_dir
    assert _snapshots(run) == [] and (run / EMA_NAME).exists()


def test_a_resumed_run_keeps_its_own_snapshots(tmp_path):
    """A run of 6 steps keeping 2 holds ema-4 and ema-6; resumed to 10 (keeping 2, from its checkpoint) the new
    run directory holds ema-8 and ema-10, and the first run's snapshots are left as they were."""
    data = edge_bar_dataset(80)
    first = train(_cfg(tmp_path, "runs", max_steps=6, keep_snapshots=2), data).run_dir
    assert _snapshots(first) == ["ema-0000004.pt", "ema-0000006.pt"]
    before = {name: (first / name).read_bytes() for name in _snapshots(first)}
    again = TrainConfig(resume=str(first), max_steps=10, out=str(tmp_path / "runs"), device="cpu")
    resumed = train(again, data).run_dir
    assert resumed != first
    assert _snapshots(resumed) == ["ema-0000008.pt", "ema-0000010.pt"]
    assert {name: (first / name).read_bytes() for name in _snapshots(first)} == before


def test_prune_orders_by_step_and_leaves_other_files(tmp_path):
    """Past 7 digits the names no longer sort as text; pruning goes by the step. ema.pt, a temporary file
    and other names are not snapshots."""
    for step in (9_999_998, 9_999_999, 10_000_000, 10_000_001):
        (tmp_path / snapshot_name(step)).write_bytes(b"x")
    others = ["ema.pt", ".ema-0000005.pt.tmp-123", "ema-best.pt", "ema-12.txt"]
    for name in others:
        (tmp_path / name).write_bytes(b"x")
    kept = prune_snapshots(tmp_path, 2)
    assert [p.name for p in kept] == ["ema-10000000.pt", "ema-10000001.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["ema-10000000.pt", "ema-10000001.pt"])
    with pytest.raises(ValueError):
        prune_snapshots(tmp_path, 0)
