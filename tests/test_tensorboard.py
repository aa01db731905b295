"""--tensorboard: <run>/tensorboard/ holds log.csv's values (same names, same steps, a resumed run's carried
rows too) and the sample grids, read back with TensorBoard's own event reader; without the package, one
line and exit 2 before any run directory exists."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from shared import flags
from shared.records.runs import LOG_COLUMNS, read_log
from shared.training.config import TrainConfig
from shared.training.loop import train
from shared.training.recorder import TENSORBOARD_DIR
from tests.stage3_helpers import TRAIN_SCRIPT, edge_bar_dataset, one_thread, write_edge_bar_idx  # noqa: F401
from tests.scripts import load_script


def _events(run):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard package is not installed (pip install tensorboard, or the test extra)")
    acc = event_accumulator.EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _cfg(tmp_path, name: str, **overrides) -> TrainConfig:
    base = dict(preset="tiny", timesteps=50, batch_size=4, heldout_size=8, judge_heldout=0, log_every=2,
                eval_every=3, sample_every=4, sample_steps=2, ckpt_every=4, device="cpu", precision="fp32",
                out=str(tmp_path / name), seed=2, tensorboard=True)
    return TrainConfig(**{**base, **overrides})


def _assert_scalars_match_log(run) -> None:
    acc = _events(run)
    rows = read_log(run / "log.csv")
    assert rows
    for column in LOG_COLUMNS:
        if column == "step":
            continue
        expected = {int(r["step"]): float(r[column]) for r in rows if r[column] != ""}
        got = {e.step: e.value for e in acc.Scalars(column)} if column in acc.Tags()["scalars"] else {}
        assert got.keys() == expected.keys(), column
        for step, value in expected.items():  # events hold float32
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (column, step)


def test_scalars_and_grids_match_log_csv_and_the_pngs(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="the tensorboard package is not installed")
    run = train(_cfg(tmp_path, "runs", max_steps=8), edge_bar_dataset(60)).run_dir
    _assert_scalars_match_log(run)
    assert "heldout_loss" in _events(run).Tags()["scalars"]  # rows at evaluations carry it
    images = _events(run).Images("samples")
    grids = sorted(run.glob("samples-*.png"))
    assert [e.step for e in images] == [4, 8] and len(grids) == 2
    for event, png in zip(images, grids):
        assert png.name == f"samples-{event.step:07d}.png"
        shown = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert np.array_equal(shown, np.asarray(Image.open(png).convert("RGB")))


def test_a_resumed_run_carries_the_earlier_rows_as_log_csv_does(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="the tensorboard package is not installed")
    data = edge_bar_dataset(60)
    first = train(_cfg(tmp_path, "runs", max_steps=4), data).run_dir
    resumed = train(TrainConfig(resume=str(first), max_steps=8, out=str(tmp_path / "runs"), device="cpu"), data).run_dir
    assert [int(r["step"]) for r in read_log(resumed / "log.csv")][:2] == [2, 3]
    _assert_scalars_match_log(resumed)


def test_without_the_package_one_line_and_exit_2_before_any_run_dir(tmp_path, monkeypatch, capsys):
    """torch.utils.tensorboard made unimportable (as where tensorboard is not installed)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    data = write_edge_bar_idx(tmp_path / "data", n=40)
    out = tmp_path / "runs"
    script = load_script(TRAIN_SCRIPT)
    with pytest.raises(SystemExit) as stopped:
        flags.run_main(script.main, ["--dataset", "mnist", "--data-dir", str(data), "--preset", "tiny", "--max-steps",
                                   "2", "--device", "cpu", "--out", str(out), "--tensorboard"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --tensorboard needs the tensorboard package (pip install tensorboard)"]
    assert not out.exists() or not any(out.iterdir())
