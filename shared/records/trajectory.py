"""A sampler callback that keeps one sample's path, and its pictures: x_t above x̂0, as a strip and a GIF."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from shared.errors import UserError
from shared.records.images import PICTURE_SCALE, grid_image, save_grid

# Trajectory pictures: how many columns the x_t / x̂0 strip has, and the GIF's frame time.
TRAJECTORY_COLUMNS = 10
GIF_FRAME_MS = 100
GIF_MAX_FRAMES = 40  # noise frames barely compress: 40 frames of 2 digits at GIF_SCALE stay < 200 KB
GIF_SCALE = 2


class TrajectoryRecorder:
    """Keeps x_t and x̂0 of the first sample at every step of the first batch (a sampler callback)."""

    def __init__(self):
        self.timesteps: list[int] = []
        self.x_t: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []
        self.complete = False

    def __call__(self, step: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if step == 0 and self.timesteps:  # a later batch starts: the first batch's chain is complete
            self.complete = True
        if self.complete:
            return
        self.timesteps.append(t)
        self.x_t.append(x_t[:1].detach().float().cpu())
        self.x0.append(x0_pred[:1].detach().float().cpu())

    def save(self, final: torch.Tensor, folder: Path) -> list[Path]:
        """trajectory.png (top: x_t, bottom: x̂0, at evenly spaced steps) and trajectory.gif."""
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
