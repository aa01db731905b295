"""What the sampling scripts (stage 4 and 5) share: their sampler flags, loading a checkpoint for them,
a timed sampling call, and the trajectory / step-comparison pictures.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch

from shared.interface import cli
from shared.errors import UserError
from shared.diffusion.guidance import MAX_GUIDANCE
from shared.diffusion.samplers import SAMPLERS, sample
from shared.diffusion.steps import SPACINGS, VARIANCES
from shared.model.precision import PRECISIONS

# Trajectory pictures: how many columns the x_t / x̂0 strip has, and the GIF's frame time.
TRAJECTORY_COLUMNS = 10
GIF_FRAME_MS = 100
GIF_MAX_FRAMES = 40  # noise frames barely compress: 40 frames of 2 digits at GIF_SCALE stay < 200 KB
GIF_SCALE = 2
PICTURE_SCALE = 3  # 28-pixel digits are enlarged (nearest) to be visible


def add_sampler_args(parser: argparse.ArgumentParser, default_sampler: str = "ddim") -> None:
    g = parser.add_argument_group("sampler")
    g.add_argument("--checkpoint", required=True, help="a run directory (its ema.pt) or a checkpoint file")
    g.add_argument("--sampler", choices=SAMPLERS, default=default_sampler,
                   help="ddpm: ancestral (Ho et al. Alg. 2); ddim: Song et al. Eq. 12; dpmpp: DPM-Solver++(2M)")
    g.add_argument("--steps", type=cli.positive_int, default=None,
                   help="sampling steps S; None means T for ddpm and 50 for ddim/dpmpp")
    g.add_argument("--eta", type=cli.nonneg_float, default=0.0, help="DDIM η (0: deterministic)")
    g.add_argument("--spacing", choices=SPACINGS, default="trailing", help="how S of the T timesteps are picked")
    g.add_argument("--variance", choices=VARIANCES, default="fixed_small", help="DDPM σ_t²: β̃_t or β_t")
    g.add_argument("--clip-x0", action="store_true", help="clip the predicted x̂0 to [-1, 1] at every step")
    g.add_argument("--guidance-scale", type=cli.float_in(0.0, MAX_GUIDANCE), default=1.0,
                   help="classifier-free guidance w: 0 unconditional, 1 conditional, >1 guided")
    g.add_argument("--batch-size", type=cli.positive_int, default=64, help="images per forward pass")
    g.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the first image; image i uses seed+i")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype of the U-Net")
    g.add_argument("--fused-kernels", action="store_true",
                   help="fused Triton U-Net ops and the fused C++/CUDA sampling step (fails if unavailable)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def load_model(args: argparse.Namespace):
    """(model, schedule, meta, device) from --checkpoint/--device/--fused-kernels; errors are UserErrors."""
    from shared.records.checkpoint import load_for_sampling

    device = cli.pick_device(args.device)
    model, schedule, meta = load_for_sampling(args.checkpoint, device)
    if args.fused_kernels:
        model.set_fused_kernels(True)  # raises FusedKernelsUnavailable (a UserError) with the reason
    if args.steps is not None and args.steps > schedule.num_timesteps:
        raise UserError(f"--steps {args.steps} exceeds the model's T = {schedule.num_timesteps}")
    return model, schedule, meta, device


def sampler_kwargs(args: argparse.Namespace, **overrides) -> dict:
    """The keyword arguments of shared.diffusion.samplers.sample that the flags decide."""
    kw = dict(sampler=args.sampler, num_steps=args.steps, eta=args.eta, spacing=args.spacing,
              variance=args.variance, clip_x0=args.clip_x0, guidance_scale=args.guidance_scale,
              batch_size=args.batch_size, precision=args.precision, fused_step=args.fused_kernels,
              progress=not args.no_progress)
    kw.update(overrides)
    return kw


def timed_sample(model, schedule, seeds: Sequence[int], device: torch.device, **kw) -> tuple[torch.Tensor, float]:
    """sample(...) and its throughput in images/s (wall clock, synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = sample(model, schedule, seeds, device=device, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, len(seeds) / (time.perf_counter() - start)


def default_labels(model, n: int, label: int | None = None) -> torch.Tensor | None:
    """Round-robin labels 0, 1, … for a class-conditional model (or all `label`); None when unconditional."""
    if model.num_classes == 0:
        if label is not None:
            raise UserError("this checkpoint is unconditional: it takes no --label")
        return None
    if label is not None:
        if not 0 <= label < model.num_classes:
            raise UserError(f"--label must lie in [0, {model.num_classes - 1}], got {label}")
        return torch.full((n,), label, dtype=torch.long)
    return torch.arange(n) % model.num_classes


class TrajectoryRecorder:
    """Keeps x_t and x̂0 of the first sample at every step (a sampler callback)."""

    def __init__(self):
        self.timesteps: list[int] = []
        self.x_t: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []

    def __call__(self, step: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        self.timesteps.append(t)
        self.x_t.append(x_t[:1].detach().float().cpu())
        self.x0.append(x0_pred[:1].detach().float().cpu())

    def save(self, final: torch.Tensor, folder: Path) -> list[Path]:
        """trajectory.png (top: x_t, bottom: x̂0, at evenly spaced steps) and trajectory.gif."""
        from PIL import Image

        from shared.records.images import grid_image, save_grid

        n = len(self.timesteps)
        if n == 0:
            raise UserError("no steps were recorded")
        picks = sorted({round(i * (n - 1) / max(TRAJECTORY_COLUMNS - 1, 1)) for i in range(TRAJECTORY_COLUMNS)})
        top = torch.cat([self.x_t[i] for i in picks] + [final[:1].float().cpu()])
        bottom = torch.cat([self.x0[i] for i in picks] + [final[:1].float().cpu()])
        strip = folder / "trajectory.png"
        save_grid(torch.cat([top, bottom]), strip, nrow=len(picks) + 1, scale=PICTURE_SCALE)
        frames_idx = sorted({round(i * (n - 1) / max(GIF_MAX_FRAMES - 1, 1)) for i in range(min(n, GIF_MAX_FRAMES))})
        frames = []
        for i in frames_idx:  # each frame: x_t beside x̂0
            image = grid_image(torch.cat([self.x_t[i], self.x0[i]]), nrow=2)
            frames.append(image.resize((image.width * GIF_SCALE, image.height * GIF_SCALE), Image.NEAREST))
        gif = folder / "trajectory.gif"
        frames[0].save(gif, save_all=True, append_images=frames[1:] + [frames[-1]] * 10, duration=GIF_FRAME_MS,
                       loop=0)
        return [strip, gif]


def plot_quality_vs_steps(rows: list[dict], path: Path) -> Path:
    """quality.png: mean class accuracy and Fréchet distance (with its real floor) against step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
