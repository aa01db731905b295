"""The judge's classifiers: small CNNs trained on the real images, their predictions, and their file format.

    SmallCNN                 conv·conv·pool · conv·conv·pool · fc(→128) · fc(128→K): MNIST-family digits
    CifarResNet              a ResNet-9 (Page 2018) at a quarter of its width, 128-d pooled features: CIFAR-10
    train_classifier         one-cycle LR (Adam, or SGD with Nesterov momentum), random translation
                             (±shift_pixels) and, for photographs, left-right flips
    predict / accuracy       argmax of the logits (images clipped to [−1, 1] first, like saved pictures)
    class_probabilities      p(y | x) = softmax of the logits, what the Inception Score averages over
    save / load_classifier   a weights-only dict with a format tag; bad files are one-line UserErrors
    recipe_for               the recipe a dataset's judge is trained with (CIFAR_RECIPE for CIFAR-10)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.errors import UserError
from shared.model.precision import autocast
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


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class _Residual(nn.Module):
    """x + (conv·BN·ReLU)²(x): the two-conv residual branch of ResNet-9."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(*_conv_bn_relu(channels, channels), *_conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class CifarResNet(nn.Module):
    """ResNet-9 (D. Page, "How to train your ResNet", 2018: the DAWNBench CIFAR-10 network) at a quarter
    of its width, widths 16 · 32 · 64 · 128 instead of 64 · 128 · 256 · 512:

        prep conv(c→16) · conv(16→32)·pool · res(32) · conv(32→64)·pool · conv(64→128)·pool · res(128)
        · global max pool → 128-d features · fc(128→classes)

    Input [N x C x S x S] in [−1, 1], S divisible by 8 (32 → 16 → 8 → 4). `features` gives the pooled
    128-d activations the Fréchet distance compares (the same FEATURE_DIM as SmallCNN's). About 24 M
    multiply-adds per 32×32 image.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be divisible by 8, got {image_size}")
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        w = FEATURE_DIM // 8
        self.body = nn.Sequential(*_conv_bn_relu(in_channels, w), *_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
                                  _Residual(2 * w), *_conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
                                  *_conv_bn_relu(4 * w, FEATURE_DIM), nn.MaxPool2d(2), _Residual(FEATURE_DIM),
                                  nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [N x 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [N x num_classes]


# The judge networks by the name their files record ("arch"); files without one hold a SmallCNN.
ARCHITECTURES = {"small-cnn": SmallCNN, "resnet": CifarResNet}


def architecture_name(model: nn.Module) -> str:
    return next(name for name, cls in ARCHITECTURES.items() if type(model) is cls)


def check_images(images: torch.Tensor, model: nn.Module, what: str) -> None:
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


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right (along W) with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the judge's classifier is trained: a one-cycle cosine LR and augmentation.

    The defaults are the MNIST-family recipe (SmallCNN, Adam, ±2 px shifts); CIFAR_RECIPE is CIFAR-10's.
    """
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    shift_pixels: int = SHIFT_PIXELS  # the random translation (0 when position is what defines the class)
    arch: str = "small-cnn"           # a key of ARCHITECTURES
    flip: bool = False                # mirror half the images left-right: photographs, never digits
    optimizer: str = "adam"           # "adam", or "sgd": Nesterov momentum 0.9 with weight_decay
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    precision: str = "fp32"           # autocast of the training forwards (shared.model.precision); loss in fp32
    channels_last: bool = False       # the layout oneDNN and cuDNN run BatchNorm'd convolutions fastest in


# CIFAR-10: ResNet-9's recipe (Page 2018: SGD with Nesterov momentum, one-cycle LR, weight decay 5e-4,
# label smoothing, random crops after a 4 px pad and flips) at 20 epochs of the 25,000 train images:
# 83.6 % on the test split (12 epochs: 80.9 %); one CPU thread takes about 26 s an epoch in bf16, which
# runs 2.4x the images/s of fp32 there (stage5_guidance/README.md has the measurement).
CIFAR_RECIPE = ClassifierRecipe(epochs=20, batch_size=256, lr=0.2, shift_pixels=4, arch="resnet", flip=True,
                                optimizer="sgd", weight_decay=5e-4, label_smoothing=0.1, precision="bf16",
                                channels_last=True)
RECIPES = {"cifar10": CIFAR_RECIPE}


def recipe_for(dataset: str, **changes) -> ClassifierRecipe:
    """The recipe `dataset`'s judge is trained with (CIFAR_RECIPE, else the MNIST-family default), with
    `changes` (ClassifierRecipe fields) applied."""
    return replace(RECIPES.get(dataset, ClassifierRecipe()), **changes)


def _optimizer(model: nn.Module, recipe: ClassifierRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                               weight_decay=recipe.weight_decay)
    raise UserError(f"unknown classifier optimizer {recipe.optimizer!r}; choose adam or sgd")


def build_classifier(arch: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The judge network named `arch` for [in_channels x image_size x image_size] images; a UserError for
    an unknown name or a size it cannot take."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](in_channels, image_size, num_classes)
    except ValueError as err:
        raise UserError(f"the {arch} classifier cannot take {in_channels} x {image_size}² images: {err}") from None


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     recipe: ClassifierRecipe = ClassifierRecipe(), device: torch.device | str = "cpu",
                     progress: bool = True) -> nn.Module:
    """Trains the recipe's network (SmallCNN or CifarResNet); returns it in eval mode.

    images: [N x C x H x W] in [−1, 1]; labels: [N] in [0, num_classes).
    """
    epochs, batch_size = recipe.epochs, recipe.batch_size
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise UserError(f"need matching, non-empty images and labels, got {images.shape[0]} and {labels.shape[0]}")
    torch.manual_seed(recipe.seed)
    model = build_classifier(recipe.arch, images.shape[1], images.shape[-1], num_classes).to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    opt = _optimizer(model, recipe)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc="classifier", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(images.shape[0], generator=gen)
            for start in range(0, images.shape[0], batch_size):
                idx = order[start:start + batch_size]
                x = _shift(images[idx].to(device), gen, recipe.shift_pixels)
                x = _flip(x, gen) if recipe.flip else x
                if recipe.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, recipe.precision):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), labels[idx].to(device), label_smoothing=recipe.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def class_probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    """p(y | x) [N x K] float32 for images [N x C x H x W] in [−1, 1] (clipped first, like saved pictures)."""
    check_images(images, model, "classifier")
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device).clamp(-1, 1)).float().softmax(1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    """Predicted classes [N] for images [N x C x H x W] in [−1, 1]."""
    return class_probabilities(model, images, batch_size).argmax(1)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images) == labels.cpu()).float().mean())


def per_class_accuracy(model: nn.Module, images: torch.Tensor, asked: torch.Tensor,
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


def save_classifier(model: nn.Module, path: str | os.PathLike, meta: dict) -> Path:
    """Writes the classifier atomically (never a half-written file), with its architecture's name; a
    full disk is a one-line UserError."""
    path = check_classifier_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_save({"format": CLASSIFIER_FORMAT, "arch": architecture_name(model), "config": dict(model.config),
                            "state_dict": {k: v.cpu().contiguous() for k, v in model.state_dict().items()},
                            "meta": dict(meta)}, path)
    except OSError as err:
        raise UserError(f"cannot write classifier {str(path)!r} ({err.strerror or type(err).__name__})") from None


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Loads a classifier saved by save_classifier (weights_only): the network its "arch" names (SmallCNN
    for files from before there were two); bad files are UserErrors."""
    path = check_classifier_path(path)
    if not path.is_file():
        raise UserError(f"classifier {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or code-carrying pickles all land here
        raise UserError(f"classifier {str(path)!r} cannot be read ({type(err).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{str(path)!r} is not a classifier file (expected format {CLASSIFIER_FORMAT})")
    arch = obj.get("arch", "small-cnn")
    if arch not in ARCHITECTURES:
        raise UserError(f"classifier {str(path)!r} is a {arch!r} network, which this version does not know "
                        f"({', '.join(ARCHITECTURES)})")
    try:
        model = ARCHITECTURES[arch](**obj["config"])
        model.load_state_dict(obj["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"classifier {str(path)!r} does not fit {ARCHITECTURES[arch].__name__}: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval().requires_grad_(False), dict(obj.get("meta", {}))
