"""The judge's classifier: a small CNN trained on the real images, its predictions, and its file format.

    SmallCNN                 conv·conv·pool · conv·conv·pool · fc(→128) · fc(128→K)
    train_classifier         Adam, one-cycle cosine LR, ±SHIFT_PIXELS translation augmentation
    predict / accuracy       argmax of the logits (images clipped to [−1, 1] first, like saved pictures)
    class_probabilities      p(y | x) = softmax of the logits, what the Inception Score averages over
    save / load_classifier   a weights-only dict with a format tag; bad files are one-line UserErrors
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.errors import UserError
from shared.records.checkpoint import atomic_save

CLASSIFIER_FORMAT = "ddpm-from-scratch/classifier/1"
FEATURE_DIM = 128
SHIFT_PIXELS = 2  # random-translation augmentation, ±2 px, keeps MNIST digits legible
DEFAULT_EPOCHS = 8
PREDICT_BATCH = 512


class SmallCNN(nn.Module):
    """conv(c→16)·conv(16→16)·pool · conv(16→32)·conv(32→32)·pool · fc(→128) · fc(128→classes).

    Input [N x C x H x W] in [−1, 1], H = W divisible by 4. `features` gives the 128-d penultimate
    activations (after ReLU) that the Fréchet distance compares.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 16):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes, width=width)

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
                                  *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, FEATURE_DIM),
                                  nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [N x 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # [N x num_classes]


def check_images(images: torch.Tensor, model: SmallCNN, what: str) -> None:
    """UserError unless images is [N x C x S x S] with the classifier's C and S."""
    c, s = model.config["in_channels"], model.config["image_size"]
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
        raise UserError(f"{what}: expected images of shape N x {c} x {s} x {s} (the classifier's), got "
                        f"{tuple(images.shape)}")


def _shift(x: torch.Tensor, gen: torch.Generator, pixels: int) -> torch.Tensor:
    """Random translation by up to ±pixels (pad with the background −1, random crop), per image."""
    if pixels == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, [pixels] * 4, value=-1.0)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (N, H)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (N, W)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the judge's classifier is trained: Adam with a one-cycle cosine LR and shift augmentation."""
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    shift_pixels: int = SHIFT_PIXELS  # the random translation (0 when position is what defines the class)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     recipe: ClassifierRecipe = ClassifierRecipe(), device: torch.device | str = "cpu",
                     progress: bool = True) -> SmallCNN:
    """Trains SmallCNN by `recipe`; returns it in eval mode.

    images: [N x C x H x W] in [−1, 1]; labels: [N] in [0, num_classes).
    """
    epochs, batch_size, lr, seed = recipe.epochs, recipe.batch_size, recipe.lr, recipe.seed
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise UserError(f"need matching, non-empty images and labels, got {images.shape[0]} and {labels.shape[0]}")
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], images.shape[-1], num_classes).to(device)
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc="classifier", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(images.shape[0], generator=gen)
            for start in range(0, images.shape[0], batch_size):
                idx = order[start:start + batch_size]
                x = _shift(images[idx].to(device), gen, recipe.shift_pixels)
                loss = F.cross_entropy(model(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def class_probabilities(model: SmallCNN, images: torch.Tensor, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    """p(y | x) [N x K] float32 for images [N x C x H x W] in [−1, 1] (clipped first, like saved pictures)."""
    check_images(images, model, "classifier")
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device).clamp(-1, 1)).float().softmax(1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def predict(model: SmallCNN, images: torch.Tensor, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    """Predicted classes [N] for images [N x C x H x W] in [−1, 1]."""
    return class_probabilities(model, images, batch_size).argmax(1)


def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images) == labels.cpu()).float().mean())


def per_class_accuracy(model: SmallCNN, images: torch.Tensor, asked: torch.Tensor,
                       num_classes: int) -> dict[int, float]:
    """For each class k that was asked for: the fraction of its samples classified as k."""
    predicted, asked = predict(model, images), asked.cpu()
    return {k: float((predicted[asked == k] == k).float().mean()) for k in range(num_classes)
            if bool((asked == k).any())}


def check_classifier_path(path: str | os.PathLike) -> Path:
    """The --classifier path checked before any slow work: a file, or a name in a directory that exists
    or can be made. One-line UserErrors for a directory, or a parent that is a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"classifier {str(path)!r} is a directory; give a file name such as {str(path / 'classifier.pt')!r}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"classifier {str(path)!r} cannot be written: {str(parent)!r} is a file, not a directory")
            break
    return path


def save_classifier(model: SmallCNN, path: str | os.PathLike, meta: dict) -> Path:
    """Writes the classifier atomically (never a half-written file); a full disk is a one-line UserError."""
    path = check_classifier_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_save({"format": CLASSIFIER_FORMAT, "config": dict(model.config),
                            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                            "meta": dict(meta)}, path)
    except OSError as err:
        raise UserError(f"cannot write classifier {str(path)!r} ({err.strerror or type(err).__name__})") from None


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[SmallCNN, dict]:
    """Loads a classifier saved by save_classifier (weights_only); bad files are UserErrors."""
    path = check_classifier_path(path)
    if not path.is_file():
        raise UserError(f"classifier {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or code-carrying pickles all land here
        raise UserError(f"classifier {str(path)!r} cannot be read ({type(err).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{str(path)!r} is not a classifier file (expected format {CLASSIFIER_FORMAT})")
    try:
        model = SmallCNN(**obj["config"])
        model.load_state_dict(obj["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"classifier {str(path)!r} does not fit SmallCNN: {str(err).splitlines()[0]}") from None
    return model.to(device).eval().requires_grad_(False), dict(obj.get("meta", {}))
