"""One picture of a training run: the loss curve beside the EMA sample grids drawn along the way.

    python stage3_train/run_figure.py runs/00003-mnist-tiny-fp32 run.png [--grids 4]

Reads the run directory's `log.csv` (training loss per logged window, held-out loss at each evaluation)
and its `samples-NNNNNNN.png` grids; the loss panel marks the steps whose grids are shown.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from PIL import Image, UnidentifiedImageError  # noqa: E402

from shared.errors import UserError  # noqa: E402
from shared.records.plots import save_figure_atomically  # noqa: E402
from shared.records.runs import read_log  # noqa: E402

_GRID = re.compile(r"^samples-(\d+)\.png$")


def sample_grids(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every sample grid in the run directory, by step."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := _GRID.match(p.name))]
    return sorted(found)


def pick_evenly(items: list, k: int) -> list:
    """k items spread evenly over the list, always the first and the last (all of them if k ≥ len)."""
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def _loss_series(rows: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    held = [(int(r["step"]), float(r["heldout_loss"])) for r in rows if r.get("heldout_loss")]
    return train, held


def run_figure(run_dir: str | os.PathLike, out_path: str | os.PathLike, grids: int = 4, title: str | None = None):
    """Draws the run's loss curve and up to `grids` of its sample grids (evenly spaced in step, the last
    always included) side by side into the PNG `out_path`, written whole or not at all.

    Returns the (closed) Figure: axes[0] is the loss panel, axes[1:] the grids in step order.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory")
    train, held = _loss_series(read_log(run_dir / "log.csv"))
    if not train:
        raise UserError(f"{run_dir / 'log.csv'} is missing or holds no training loss")
    shown = pick_evenly(sample_grids(run_dir), grids)
    if not shown:
        raise UserError(f"{run_dir} holds no samples-NNNNNNN.png grids")
    images = []
    for step, path in shown:
        try:
            with Image.open(path) as image:
                images.append((step, image.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{path} is not a readable PNG ({err})") from None

    fig = plt.figure(figsize=(4.8 + 3.0 * len(images), 4.0))
    spec = fig.add_gridspec(1, 1 + len(images), width_ratios=[1.7] + [1] * len(images), wspace=0.08)
    ax = fig.add_subplot(spec[0])
    ax.plot(*zip(*train), lw=0.8, color="#4c72b0", label="training loss (L_simple)")
    if held:
        ax.plot(*zip(*held), "o-", ms=3.5, color="#dd8452", label="held-out loss, EMA (fixed t, ε)")
    for step, _ in images:
        ax.axvline(step, color="#999999", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE(ε, ε_θ(x_t, t))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5)
    for i, (step, image) in enumerate(images):
        grid_ax = fig.add_subplot(spec[1 + i])
        grid_ax.imshow(image, interpolation="nearest")
        grid_ax.set_title(f"step {step:,}", fontsize=9)
        grid_ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    _save_whole(fig, out_path)
    return fig


def _save_whole(fig, out_path: str | os.PathLike) -> None:
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        plt.close(fig)
        raise UserError(f"cannot write {out_path}: the folder {folder} does not exist")
    save_figure_atomically(fig, out_path, dpi=110)
