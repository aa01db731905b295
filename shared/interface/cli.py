"""The flags several stage scripts share beyond the sampler's (shared.interface.sampling_args): the
dataset and the noise schedule."""
from __future__ import annotations

import argparse

from shared import flags
from shared.data.datasets import DATASET_NAMES
from shared.diffusion.schedule import SCHEDULE_KINDS


def add_dataset_args(parser: argparse.ArgumentParser, default: str = "mnist") -> None:
    parser.add_argument("--dataset", choices=DATASET_NAMES, default=default,
                        help="dataset; 'folder' reads --data-dir: a folder of images (unconditional) or one sub-folder per class")
    parser.add_argument("--data-dir", default=None,
                        help="where the data lives: MNIST-format IDX files (offline), an image folder "
                             "(--dataset folder), or a torchvision root; default ./data")


def add_schedule_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", choices=SCHEDULE_KINDS, default="linear", help="noise schedule β_t")
    parser.add_argument("--timesteps", type=flags.int_in(1, 100_000), default=1000, help="T, diffusion steps")
