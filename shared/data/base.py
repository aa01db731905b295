"""What every reader in shared/data returns and raises, and the pieces the readers share.

    DataError             data that is missing, unreadable or malformed: one line for the user
    DatasetInfo           a dataset's name, split, classes, image shape and where it was read from
    TensorImageDataset    uint8 images [N x C x H x W] with labels, served in [−1, 1] (from_uint8)
    progress_bar          the decode/check progress bar of large image sets
    unreadable_message    the one line for a file PIL cannot decode
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from shared.errors import UserError

PROGRESS_MIN_IMAGES = 1000  # image sets this large show a progress bar while they are decoded or checked


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Stored pixels, uint8 in [0, 255], as float32 in [−1, 1]: x / 127.5 − 1 (records.images.to_uint8 inverts it)."""
    return pixels.float() / 127.5 - 1.0


class DataError(UserError):
    """Data that is missing, unreadable or malformed."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    split: str            # "train" or "test"
    num_classes: int
    image_shape: tuple    # (C, H, W)
    source: str           # where the images were read from
    class_names: tuple = ()  # named classes (image folders, CIFAR-10): label k is class_names[k]
    note: str = ""        # what a reader of figures measured on these images should know (a JPEG copy…)

    def to_dict(self) -> dict:
        named = {"class_names": list(self.class_names)} if self.class_names else {}
        noted = {"note": self.note} if self.note else {}
        return {"name": self.name, "split": self.split, "num_classes": self.num_classes,
                "image_shape": list(self.image_shape), "source": self.source, **named, **noted}


class TensorImageDataset(Dataset):
    """uint8 images [N x C x H x W] and int labels [N], served as (float32 image in [-1, 1], int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        self.images, self.labels, self.info = images, labels, info

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return from_uint8(self.images[index]), int(self.labels[index])


def unreadable_message(path, err: Exception) -> str:
    """The one line for an image file (or zip member) at `path` that PIL could not open or decode."""
    if isinstance(err, UnidentifiedImageError):
        return f"{path} is not an image (not a format PIL reads)"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{path} is not a readable image ({reason})"


def progress_bar(total: int, quiet: bool):
    """iterable, description → the iterable with a progress bar on stderr (none when quiet or small)."""

    def wrap(items, desc: str):
        return tqdm(items, total=total, desc=desc, unit="image", disable=quiet or total < PROGRESS_MIN_IMAGES,
                    leave=False)
    return wrap
