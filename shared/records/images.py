"""Turning tensors in [-1, 1] into pictures."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PICTURE_SCALE = 3  # 28-pixel digits are enlarged (nearest) to be visible in the stage pictures


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Maps [-1, 1] to uint8 [0, 255] (values outside are clipped), keeping the shape."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(x: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """A PIL image of a batch [N x C x H x W] in [-1, 1] laid out nrow images per row, `padding` white
    pixels around each; one image comes back alone, without the frame."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape N x 1|3 x H x W, got {tuple(x.shape)}")
    images = to_uint8(x.cpu()).expand(-1, 3, -1, -1)                      # grey is shown as RGB
    n, _, height, width = images.shape
    if n == 1:
        return Image.fromarray(images[0].permute(1, 2, 0).numpy())
    cols, rows = min(nrow, n), -(-n // nrow)
    cell_h, cell_w = height + padding, width + padding
    grid = torch.full((3, rows * cell_h + padding, cols * cell_w + padding), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = (i // cols) * cell_h + padding, (i % cols) * cell_w + padding
        grid[:, top:top + height, left:left + width] = image
    return Image.fromarray(grid.permute(1, 2, 0).numpy())                 # (H', W', 3)


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 1) -> None:
    """Saves a batch in [-1, 1] as one PNG grid; `scale` enlarges it (nearest) for small digits."""
    image = grid_image(x, nrow)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


class SampleWriter:
    """Every sample as its own PNG (images/000000.png …) and, on `close`, one samples.npz, batch by batch.

    samples.npz holds `images` uint8 [N x H x W x C], `labels` int64 [N] (−1: unconditional) and `seeds`
    int64 [N], the layout FID tools read (clean-fid, torch-fidelity). The uint8 images wait in a
    memory-mapped .npy beside it, so memory stays one batch whatever N is; numpy copies them into the
    archive in buffered chunks.
    """

    IMAGES_DIR, ARCHIVE, PENDING = "images", "samples.npz", ".samples-images.npy"

    def __init__(self, run_dir: str | os.PathLike, n: int, shape_chw: tuple[int, int, int]):
        self.run_dir, self.n, self.count = Path(run_dir), n, 0
        (self.run_dir / self.IMAGES_DIR).mkdir()
        channels, height, width = shape_chw
        self.pending = np.lib.format.open_memmap(self.run_dir / self.PENDING, mode="w+", dtype=np.uint8,
                                                 shape=(n, height, width, channels))
        self.labels = np.full(n, -1, dtype=np.int64)
        self.seeds = np.zeros(n, dtype=np.int64)

    def add(self, images: torch.Tensor, labels: torch.Tensor | None, seeds) -> None:
        """images: [B x C x H x W] in [−1, 1]; labels: [B] or None; seeds: B ints."""
        batch = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()          # (B, H, W, C)
        end = self.count + batch.shape[0]
        if end > self.n:
            raise ValueError(f"{end} samples added to a writer for {self.n}")
        for i, image in enumerate(batch, start=self.count):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                self.run_dir / self.IMAGES_DIR / f"{i:06d}.png")
        self.pending[self.count:end] = batch
        if labels is not None:
            self.labels[self.count:end] = labels.cpu().numpy()
        self.seeds[self.count:end] = list(seeds)
        self.count = end

    def close(self) -> Path:
        """Writes samples.npz from everything added and removes the pending file."""
        path = self.run_dir / self.ARCHIVE
        np.savez(path, images=self.pending[:self.count], labels=self.labels[:self.count],
                 seeds=self.seeds[:self.count])
        self.pending.flush()
        del self.pending
        (self.run_dir / self.PENDING).unlink()
        return path
