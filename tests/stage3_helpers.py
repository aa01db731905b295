"""Generated data and small settings shared by the stage-3 (training) tests.

The data: 8×8 single-channel images of 4 classes — a bright 2-pixel bar at the top, bottom, left or
right edge on a dark background, with a per-image brightness. Structured enough that a tiny U-Net's
ε-prediction loss falls well below its starting value of 1 within a couple of hundred steps.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch.utils.data import Dataset

from shared.data.datasets import DatasetInfo, TensorImageDataset
from tests.idx_files import write_idx

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "stage3_train" / "train.py"
SIZE = 8
NUM_CLASSES = 4
BAR_WIDTH = 2


def edge_bars(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n x 1 x 8 x 8] in [-1, 1] and labels [n] (round-robin over the 4 classes)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.full((n, 1, SIZE, SIZE), -1.0)
    value = 0.3 + 0.7 * torch.rand(n, generator=gen)
    for i, label in enumerate(labels.tolist()):
        region = {0: (slice(0, BAR_WIDTH), slice(None)), 1: (slice(SIZE - BAR_WIDTH, SIZE), slice(None)),
                  2: (slice(None), slice(0, BAR_WIDTH)), 3: (slice(None), slice(SIZE - BAR_WIDTH, SIZE))}[label]
        images[i, 0][region] = value[i]
    return images, labels


def edge_bar_dataset(n: int = 256, seed: int = 0) -> TensorImageDataset:
    """The in-memory form of edge_bars, as shared.data.datasets serves datasets (uint8 storage, .info)."""
    images, labels = edge_bars(n, seed)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    info = DatasetInfo("mnist", "train", NUM_CLASSES, (1, SIZE, SIZE), "generated edge bars")
    return TensorImageDataset(pixels, labels, info)


def write_edge_bar_idx(folder: Path, n: int = 256, seed: int = 0) -> Path:
    """MNIST-format gzipped IDX files of edge_bars in `folder` (what --data-dir reads)."""
    data = edge_bar_dataset(n, seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", data.images.squeeze(1).numpy(), gz=True)  # (n, 8, 8)
    write_idx(folder / "train-labels-idx1-ubyte", data.labels.numpy(), gz=True)
    return folder


# Small, fast settings for a CLI run on generated data (8×8 images, few DDIM steps for the grids).
FAST_ARGS = ["--preset", "tiny", "--timesteps", "100", "--batch-size", "8", "--heldout-size", "16",
             "--sample-steps", "2", "--warmup-steps", "5", "--lr", "1e-3", "--device", "cpu"]


def single_thread_env() -> dict:
    """Environment for subprocesses: one intra-op thread (a contended 2-core CPU is far faster so)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_train(args: list[str], cwd: Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], cwd=cwd, env=single_thread_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core CPU this is many times faster for tiny models.

    Import it into a test module (``from tests.stage3_helpers import one_thread``) to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ItemsOnly(Dataset):
    """An in-memory dataset's items served one by one, without its tensor storage, so that Batches
    takes the DataLoader path instead of the device-resident one."""

    def __init__(self, base):
        self.base, self.info = base, base.info

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]
