"""Judging samples with a small classifier: per-class accuracy and a Fréchet distance on its features.

    measure                  what it says                                   computed by
    classifier accuracy      the judge is trustworthy (≥ 99 % on MNIST)     argmax of SmallCNN logits
    per-class accuracy       samples asked for class k look like class k    fraction classified as k
    Fréchet distance (FD)    generated and real feature statistics agree    torchmetrics FrechetInceptionDistance
                             ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½)     with `feature=` our penultimate layer
    real-vs-real floor       the FD two real sets of the same sizes reach   same metric, real vs real

The FD of Heusel et al. 2017 (Eq. 6) is biased upwards for small sample counts, so the floor is always
computed with as many real images as there are generated ones, against the same held-out set; only
the gap between the two numbers means anything. Inception FID (2048-d pool features of Inception-v3)
is offered for CIFAR-10 when torchvision's pretrained weights are available locally.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.errors import UserError

CLASSIFIER_FORMAT = "ddpm-from-scratch/classifier/1"
FEATURE_DIM = 128
SHIFT_PIXELS = 2  # random-translation augmentation, ±2 px, keeps MNIST digits legible
DEFAULT_EPOCHS = 8


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


def _check_images(images: torch.Tensor, model: SmallCNN, what: str) -> None:
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


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     epochs: int = DEFAULT_EPOCHS, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     shift_pixels: int = SHIFT_PIXELS, device: torch.device | str = "cpu",
                     progress: bool = True) -> SmallCNN:
    """Trains SmallCNN with Adam (one-cycle cosine LR) and shift augmentation; returns it in eval mode.

    images: [N x C x H x W] in [−1, 1]; labels: [N] in [0, num_classes).  shift_pixels: the random
    translation of the augmentation (0 when position is what defines the class).
    """
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
                x = _shift(images[idx].to(device), gen, shift_pixels)
                loss = F.cross_entropy(model(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: SmallCNN, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes [N] for images [N x C x H x W] in [−1, 1] (clipped first, like saved pictures)."""
    _check_images(images, model, "predict")
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device).clamp(-1, 1)).argmax(1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images) == labels.cpu()).float().mean())


def per_class_accuracy(model: SmallCNN, images: torch.Tensor, asked: torch.Tensor,
                       num_classes: int) -> dict[int, float]:
    """For each class k that was asked for: the fraction of its samples classified as k."""
    predicted, asked = predict(model, images), asked.cpu()
    return {k: float((predicted[asked == k] == k).float().mean()) for k in range(num_classes)
            if bool((asked == k).any())}


class PenultimateFeatures(nn.Module):
    """The feature module handed to torchmetrics: images [N x C x H x W] in [−1, 1] → [N x 128] float32."""

    def __init__(self, classifier: SmallCNN):
        super().__init__()
        self.classifier = classifier
        self.num_features = FEATURE_DIM  # torchmetrics reads this instead of probing with a dummy image

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.clamp(-1, 1).float())


def frechet_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 512) -> float:
    """FD between the feature statistics of two image sets [N x C x H x W] (torchmetrics' FID with a
    custom feature module; its matrix square root, not ours). Needs at least 2 images per set."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise UserError(f"a Fréchet distance needs >= 2 images per set, got {real.shape[0]} and {fake.shape[0]}")
    device = next(feature.parameters()).device
    metric = FrechetInceptionDistance(feature=feature, normalize=True).to(device)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, images.shape[0], batch_size):
            metric.update(images[i:i + batch_size].to(device), real=is_real)
    return float(metric.compute())


# --------------------------------------------------------------------------------------------------
# classifier files


def save_classifier(model: SmallCNN, path: str | os.PathLike, meta: dict) -> Path:
    from shared.records.checkpoint import atomic_save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save({"format": CLASSIFIER_FORMAT, "config": dict(model.config),
                        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                        "meta": dict(meta)}, path)


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[SmallCNN, dict]:
    """Loads a classifier saved by save_classifier (weights_only); bad files are UserErrors."""
    path = Path(path)
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


# --------------------------------------------------------------------------------------------------
# Inception FID (CIFAR-10)


class InceptionPool(nn.Module):
    """torchvision Inception-v3's 2048-d pool features for images in [−1, 1] (resized to 299×299)."""

    num_features = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        net.fc = nn.Identity()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((images.clamp(-1, 1) + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)  # ImageNet statistics
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        return self.net((x - mean) / std)


def load_inception() -> InceptionPool:
    """Inception-v3 with torchvision's ImageNet weights, or a UserError saying why it is unavailable."""
    try:
        from torchvision.models import Inception_V3_Weights, inception_v3

        net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1, aux_logits=True)
    except Exception as err:  # offline: URLError / RuntimeError from the download
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError("Inception FID unavailable: torchvision's Inception-v3 weights could not be loaded "
                        f"({reason}); put inception_v3_google-0cc3c7bd.pth in "
                        f"{torch.hub.get_dir()}/checkpoints to enable it") from None
    return InceptionPool(net)


# --------------------------------------------------------------------------------------------------
# reports


def format_table(report: dict) -> str:
    """A fixed-width text table of evaluate's report: one row per sampler run, the floor beside FD."""
    classes = sorted({int(k) for run in report["runs"] for k in run["per_class_accuracy"]})
    head = f"{'run':<16}{'n':>6}{'w':>6}{'mean acc':>10}{'FD':>9}{'floor':>8}  " + \
        " ".join(f"{k:>5}" for k in classes)
    lines = [f"classifier accuracy on real held-out data: {100 * report['classifier_accuracy']:.2f} % "
             f"({report['heldout_images']} images)", head, "-" * len(head)]
    for run in report["runs"]:
        per = run["per_class_accuracy"]
        cells = " ".join(f"{100 * per.get(str(k), float('nan')):5.1f}" for k in classes)
        w = "-" if run.get("guidance_scale") is None else f"{run['guidance_scale']:g}"
        mean = "-" if run["mean_class_accuracy"] is None else f"{100 * run['mean_class_accuracy']:.1f}%"
        lines.append(f"{run['name']:<16}{run['num_samples']:>6}{w:>6}"
                     f"{mean:>10}{run['frechet_distance']:>9.3f}"
                     f"{run['real_floor']:>8.3f}  {cells}")
    if report.get("inception_fid_note"):
        lines.append(report["inception_fid_note"])
    return "\n".join(lines)


def seeds_for(first_seed: int, count: int) -> list[int]:
    return list(range(first_seed, first_seed + count))


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """[0, 1, …, K−1, 0, 1, …]: per_class of each class, interleaved so any prefix is balanced."""
    return torch.arange(num_classes).repeat(per_class)


def split_real(images: torch.Tensor, labels: torch.Tensor, heldout: int) -> tuple[tuple, tuple]:
    """((train images, labels), (held-out images, labels)): the last `heldout` images are held out."""
    from shared.training.data import judge_split

    if not 0 < heldout < images.shape[0]:
        raise UserError(f"--heldout must lie in [1, {images.shape[0] - 1}] for {images.shape[0]} images, got {heldout}")
    train, held = (slice(r.start, r.stop) for r in judge_split(images.shape[0], heldout))
    return (images[train], labels[train]), (images[held], labels[held])


def stack_dataset(dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, label) pairs of a Dataset as tensors [N x C x H x W], [N]."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):  # TensorImageDataset: no per-item loop
        return dataset.images[:n].float() / 127.5 - 1.0, dataset.labels[:n].long()
    pairs = [dataset[i] for i in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def real_floor(feature: nn.Module, train_images: torch.Tensor, heldout_images: torch.Tensor, count: int,
               seed: int = 0) -> float:
    """FD of `count` random classifier-train images against the held-out set (the generated run's twin)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(train_images.shape[0], generator=gen)[:count]
    return frechet_distance(feature, heldout_images, train_images[idx])


def summarise_run(name: str, classifier: SmallCNN, feature: nn.Module, samples: torch.Tensor,
                  asked: torch.Tensor | None, heldout_images: torch.Tensor, floor: float, settings: dict) -> dict:
    """One row of the report. asked: the class each sample was drawn for (None: unconditional, so
    there are no per-class accuracies)."""
    per = {} if asked is None else per_class_accuracy(classifier, samples, asked, classifier.config["num_classes"])
    return {"name": name, "num_samples": int(samples.shape[0]), **settings,
            "per_class_accuracy": {str(k): v for k, v in per.items()},
            "mean_class_accuracy": sum(per.values()) / len(per) if per else None,
            "frechet_distance": frechet_distance(feature, heldout_images, samples), "real_floor": floor}


def parse_runs(text: str | None, default_sampler: str, default_steps: int | None) -> list[tuple[str, int | None]]:
    """'ddpm:1000,ddim:50' → [('ddpm', 1000), ('ddim', 50)]; None → the single default run."""
    if not text:
        return [(default_sampler, default_steps)]
    runs: list[tuple[str, int | None]] = []
    for part in text.split(","):
        name, _, steps = part.strip().partition(":")
        try:
            runs.append((name, int(steps) if steps else None))
        except ValueError:
            raise UserError(f"--runs entries look like ddim:50, got {part!r}") from None
    return runs


def check_dataset_matches(images: torch.Tensor, image_shape: Sequence[int], what: str) -> None:
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise UserError(f"{what}: the data have shape {tuple(images.shape[1:])} but the model makes "
                        f"{tuple(image_shape)}")


class Judge:
    """A classifier with its real data: what evaluate.py and sample.py --compare-steps measure with.

    Attributes: classifier, feature (PenultimateFeatures), train_images (classifier training split),
    heldout_images / heldout_labels (the last `heldout` images), accuracy (on the held-out split),
    source (the classifier file, and whether it was trained now).
    """

    def __init__(self, classifier: SmallCNN, train_images, heldout_images, heldout_labels, source: str):
        self.classifier, self.feature = classifier, PenultimateFeatures(classifier)
        self.train_images, self.heldout_images, self.heldout_labels = train_images, heldout_images, heldout_labels
        self.accuracy = accuracy(classifier, heldout_images, heldout_labels)
        self.source = source

    def floor(self, count: int, seed: int = 0) -> float:
        return real_floor(self.feature, self.train_images, self.heldout_images, count, seed)


def prepare_judge(dataset: str, data_dir: str | None, classifier_path: str | None, heldout: int,
                  image_shape: Sequence[int], num_classes: int, device: torch.device,
                  epochs: int = DEFAULT_EPOCHS, shift_pixels: int = SHIFT_PIXELS, progress: bool = True) -> Judge:
    """Loads the real data, splits off the held-out images, and loads the classifier from
    `classifier_path` or trains one on the rest (saving it there when a path is given)."""
    from shared.training.data import load_dataset

    data = load_dataset(dataset, data_dir=data_dir, train=True, image_size=int(image_shape[-1]), quiet=True)
    images, labels = stack_dataset(data)
    check_dataset_matches(images, image_shape, f"--dataset {dataset}")
    (train_x, train_y), (held_x, held_y) = split_real(images, labels, heldout)
    if classifier_path is not None and Path(classifier_path).exists():
        classifier, meta = load_classifier(classifier_path, device)
        if classifier.config["image_size"] != image_shape[-1] or classifier.config["in_channels"] != image_shape[0]:
            raise UserError(f"classifier {classifier_path!r} is for {classifier.config['in_channels']} x "
                            f"{classifier.config['image_size']}² images, the model makes {tuple(image_shape)}")
        source = f"{classifier_path} (loaded)"
    else:
        classes = max(num_classes, int(labels.max()) + 1)
        classifier = train_classifier(train_x, train_y, classes, epochs=epochs, shift_pixels=shift_pixels,
                                      device=device, progress=progress)
        source = "trained now"
        if classifier_path is not None:
            save_classifier(classifier, classifier_path, {"dataset": dataset, "heldout": heldout, "epochs": epochs,
                                                                 "shift_pixels": shift_pixels})
            source = f"{classifier_path} (trained now)"
    return Judge(classifier, train_x, held_x, held_y, source)
