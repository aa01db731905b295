"""Turning tensors in [-1, 1] into pictures."""
from __future__ import annotations

import os

import torch
from PIL import Image
from torchvision.utils import make_grid

PICTURE_SCALE = 3  # 28-pixel digits are enlarged (nearest) to be visible in the stage pictures


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Maps [-1, 1] to uint8 [0, 255] (values outside are clipped), keeping the shape."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(x: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """A PIL image of a batch [N x C x H x W] in [-1, 1] laid out nrow images per row."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape N x 1|3 x H x W, got {tuple(x.shape)}")
    grid = make_grid(to_uint8(x.cpu()), nrow=nrow, padding=padding, pad_value=255)  # (3, H', W')
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 1) -> None:
    """Saves a batch in [-1, 1] as one PNG grid; `scale` enlarges it (nearest) for small digits."""
    image = grid_image(x, nrow)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
