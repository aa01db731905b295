"""The run figure: the loss curve from log.csv beside sample grids, on a generated run directory."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from shared import UserError
from shared.records.images import save_grid, to_uint8
from shared.records.run_figure import pick_evenly, run_figure, sample_grids
from shared.records.runs import LOG_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, grid_steps=(100, 200, 300, 400, 500)) -> dict[int, float]:
    """A run directory with a log whose loss is 1/step and one grid per step whose brightness encodes it."""
    folder.mkdir()
    losses = {step: 1.0 / step for step in range(10, 510, 10)}
    lines = [",".join(LOG_COLUMNS)]
    for step, loss in losses.items():
        held = repr(loss * 1.1) if step % 100 == 0 else ""
        lines.append(f"{step},0,{loss!r},{held},0.001,100.0,1.0,0")
    (folder / "log.csv").write_text("\n".join(lines) + "\n")
    for step in grid_steps:
        save_grid(torch.full((4, 1, 8, 8), step / 500 - 1.0), folder / f"samples-{step:07d}.png", nrow=2)
    return losses


def test_pick_evenly_keeps_first_and_last():
    assert pick_evenly(list(range(10)), 4) == [0, 3, 6, 9]
    assert pick_evenly([1, 2], 5) == [1, 2]
    assert pick_evenly([1, 2, 3], 1) == [3]


def test_figure_shows_the_logged_losses_and_the_chosen_grids(tmp_path):
    losses = fake_run(tmp_path / "run")
    assert [s for s, _ in sample_grids(tmp_path / "run")] == [100, 200, 300, 400, 500]
    fig = run_figure(tmp_path / "run", tmp_path / "run.png", grids=3)
    loss_ax, *grid_axes = fig.axes
    train, held = loss_ax.get_lines()[:2]
    assert list(train.get_xdata()) == list(losses) and list(train.get_ydata()) == list(losses.values())
    assert list(held.get_xdata()) == [100, 200, 300, 400, 500]
    assert [ax.get_title() for ax in grid_axes] == ["step 100", "step 300", "step 500"]
    # Each panel holds its own grid: the brightness written for that step.
    for ax, step in zip(grid_axes, (100, 300, 500)):
        pixels = torch.as_tensor(ax.get_images()[0].get_array())
        expected = int(to_uint8(torch.tensor(step / 500 - 1.0)))
        assert (pixels == expected).float().mean() > 0.4  # the rest is the grid's white padding
    assert Image.open(tmp_path / "run.png").format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.png"]


def test_bad_run_directories_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        run_figure(tmp_path / "missing", tmp_path / "x.png")
    fake_run(tmp_path / "nogrids", grid_steps=())
    with pytest.raises(UserError, match="no samples-NNNNNNN.png"):
        run_figure(tmp_path / "nogrids", tmp_path / "x.png")
    fake_run(tmp_path / "run")
    (tmp_path / "run" / "samples-0000600.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="not a readable PNG"):
        run_figure(tmp_path / "run", tmp_path / "x.png", grids=1)
    assert not (tmp_path / "x.png").exists()
    res = subprocess.run([sys.executable, str(ROOT / "stage3_train" / "run_figure.py"), str(tmp_path / "missing"),
                          str(tmp_path / "x.png")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "not a run directory" in res.stderr
