"""Matplotlib figures shared by the stages (headless: the Agg backend, PNG files)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402

from shared.records.images import to_uint8  # noqa: E402
from shared.records.runs import read_log  # noqa: E402
from shared.diffusion.schedule import NoiseSchedule  # noqa: E402


def save_figure_atomically(fig, path: str | os.PathLike, dpi: int) -> None:
    """Writes fig as a PNG through a temporary file in the same folder, so `path` is never half-written;
    closes the figure either way."""
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def plot_schedules(schedules: Sequence[NoiseSchedule], path: str) -> None:
    """ᾱ_t and log-SNR λ_t = log(ᾱ_t / (1 − ᾱ_t)) against t/T, one line per schedule."""
    fig, (ax_ab, ax_snr) = plt.subplots(1, 2, figsize=(10, 3.8))
    for sched in schedules:
        frac = torch.arange(sched.num_timesteps, dtype=torch.float64) / sched.num_timesteps
        label = f"{sched.kind} (T={sched.num_timesteps})"
        ax_ab.plot(frac, sched.alphas_cumprod, label=label)
        ax_snr.plot(frac, sched.log_snr, label=label)
    ax_ab.set(xlabel="t / T", ylabel="ᾱ_t", title="signal kept: ᾱ_t")
    ax_snr.set(xlabel="t / T", ylabel="log SNR", title="log-SNR: log(ᾱ_t / (1 − ᾱ_t))")
    for ax in (ax_ab, ax_snr):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_noising_grid(images: torch.Tensor, timesteps: Sequence[int], path: str, title: str) -> None:
    """images: [rows x cols x C x H x W] in [-1, 1], column j noised to timesteps[j]; titled columns."""
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            img = to_uint8(images[r, c]).permute(1, 2, 0).numpy()
            ax = axes[r][c]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={timesteps[c]}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_quality_vs_steps(rows: list[dict], path: Path) -> Path:
    """quality.png: mean class accuracy and Fréchet distance (with its real floor) against step count."""
    steps = [r["steps"] for r in rows]
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_fd.plot(steps, [r["frechet_distance"] for r in rows], "o-", label="generated vs held-out")
    ax_fd.axhline(rows[0]["real_floor"], color="gray", ls="--", label="real vs real floor")
    ax_fd.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="Fréchet distance (classifier features)")
    ax_fd.legend(fontsize=8)
    if all(r.get("mean_class_accuracy") is not None for r in rows):
        ax_acc.plot(steps, [100 * r["mean_class_accuracy"] for r in rows], "o-")
    ax_acc.set(xscale="log", xlabel="sampling steps", ylabel="samples classified as asked (%)", ylim=(0, 101))
    fig.suptitle(f"{rows[0]['sampler']}: quality against step count", fontsize=10)
    _save(fig, path)
    return path


def plot_loss(log_path: Path, png_path: Path) -> None:
    """Draws training loss (and held-out loss where evaluated) against step, log-scaled, to png_path."""
    rows = read_log(log_path)
    steps = [int(r["step"]) for r in rows if r["loss"]]
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    held = [(int(r["step"]), float(r["heldout_loss"])) for r in rows if r.get("heldout_loss")]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=1, label="training loss (L_simple)")
    if held:
        ax.plot(*zip(*held), "o-", ms=4, label="held-out loss (fixed t, ε)")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE(ε, ε_θ)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)  # a viewer never sees a half-drawn plot


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
