"""Generated data with known classes and a tiny class-conditional model trained on it, for the sampling,
guidance, evaluation, server and script tests (no MNIST needed).

The data: 10 classes of 16×16 bars — classes 0-4 a horizontal bar on rows 2, 5, 8, 11, 14 (two
pixels wide, the last one clipped to the border), classes 5-9 a vertical bar on the same columns; the
bar's length, offset and brightness vary per image. A classifier tells them apart perfectly, so the
evaluator's answers are known.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from shared.diffusion.samplers import SamplerOptions, sample
from shared.records.checkpoint import EMA_NAME, atomic_save, ema_file
from shared.records.images import to_uint8
from shared.diffusion.schedule import NoiseSchedule
from shared.model.unet import UNet, UNetConfig
from shared.training.loss import drop_labels, l_simple
from tests.idx_files import write_idx

SIZE = 16
NUM_CLASSES = 10
BAR_POSITIONS = (2, 5, 8, 11, 14)
TRAIN_STEPS = 300
TRAIN_BATCH = 32
TIMESTEPS = 100
LABEL_DROP = 0.15  # fraction of training labels replaced by the null class (for guidance)


def bar_patterns(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n x 1 x 16 x 16] in [-1, 1] and their labels [n] (round-robin over the 10 classes)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.full((n, 1, SIZE, SIZE), -1.0)
    for i, label in enumerate(labels.tolist()):
        pos = BAR_POSITIONS[label % 5]
        start = int(torch.randint(0, 4, (1,), generator=gen))
        stop = SIZE - int(torch.randint(0, 4, (1,), generator=gen))
        value = 0.4 + 0.6 * float(torch.rand(1, generator=gen))
        if label < 5:
            images[i, 0, pos:pos + 2, start:stop] = value
        else:
            images[i, 0, start:stop, pos:pos + 2] = value
    return images, labels


def write_bar_idx(folder: Path, images: torch.Tensor, labels: torch.Tensor, split: str = "train") -> Path:
    """Writes images [N x 1 x H x W] in [-1, 1] and labels as MNIST-format gzipped IDX files (what
    shared.data.datasets reads with --data-dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images).squeeze(1).numpy()
    write_idx(folder / f"{split}-images-idx3-ubyte", pixels, gz=True)
    write_idx(folder / f"{split}-labels-idx1-ubyte", labels.to(torch.uint8).numpy(), gz=True)
    return folder


def tiny_config() -> dict:
    return UNet.from_preset("tiny", image_size=SIZE, attention_resolutions=(8,), num_classes=NUM_CLASSES).config


@functools.lru_cache(maxsize=1)
def trained_tiny_model() -> tuple[UNet, NoiseSchedule]:
    """The `tiny` U-Net (16×16, 10 classes) after TRAIN_STEPS of L_simple on bar_patterns, in eval mode."""
    torch.manual_seed(0)
    schedule = NoiseSchedule("linear", TIMESTEPS)
    model = UNet(UNetConfig(**tiny_config()))
    images, labels = bar_patterns(640, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(TRAIN_STEPS):
        idx = torch.randint(0, images.shape[0], (TRAIN_BATCH,), generator=gen)
        y = drop_labels(labels[idx], LABEL_DROP, model.null_class, generator=gen)
        loss = l_simple(model, schedule, images[idx], y, generator=gen).mean()  # DDPM Eq. 14
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return model, schedule


def random_conditional_unet() -> UNet:
    """An untrained 8×8 tiny U-Net with 3 classes and a non-zero output layer (a fresh one outputs ε ≡ 0),
    in eval mode: a model whose ε depends on x_t, t and y, for sampler tests that need no training."""
    torch.manual_seed(0)
    net = UNet.from_preset("tiny", image_size=8, attention_resolutions=(4,), num_classes=3)
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)
    return net.eval()


def save_tiny_checkpoint(folder: Path) -> Path:
    """Writes the trained tiny model as an EMA-only checkpoint (the format load_for_sampling reads)."""
    model, schedule = trained_tiny_model()
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": "mnist", "num_classes": NUM_CLASSES, "image_shape": [1, SIZE, SIZE],
            "schedule": schedule.to_dict(), "options": {"note": "tests/tiny_trained.py bar patterns"}}
    return atomic_save(ema_file(model.config, model.state_dict(), schedule.to_dict(), meta), folder / EMA_NAME)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test machine is shared: one intra-op thread is ~10× faster than two under contention.
    Import this fixture into a test module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def draw(model, schedule, seeds, labels=None, device=None, callback=None, progress=False, **options):
    """shared.diffusion.samplers.sample with the SamplerOptions fields given as keywords (the tests'
    shorthand: `draw(model, schedule, seeds, sampler="ddim", num_steps=10)`)."""
    return sample(model, schedule, seeds, SamplerOptions(**options), labels, device, callback, progress)
