"""Writes tiny MNIST-format IDX files with known contents, for data-loading tests."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """IDX format: magic (0x0000, type 0x08 = uint8, ndim), big-endian dims, then the raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_mnist_dir(folder: Path, num: int = 20, split: str = "t10k", gz: bool = True, seed: int = 0):
    """Writes `{split}-images-idx3-ubyte` (num × 28 × 28) and labels into folder; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num, 28, 28), dtype=np.uint8)
    labels = (np.arange(num) % 10).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{split}-images-idx3-ubyte", images, gz)
    write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz)
    return images, labels
