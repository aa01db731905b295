"""The judge: a classifier with the real images it is measured against.

`prepare_judge` loads the dataset, splits off the last `heldout` images (`shared.data.datasets.judge_split`,
the one split definition), and loads the classifier from its file or trains one on the other images and
saves it there before any sampling starts, so a later failure never loses it. A `Judge` then scores
samples: classifier accuracy on the held-out images, the FD floor and the real-data Inception Score at a
given sample count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from shared.data.datasets import from_uint8, judge_split, load_dataset
from shared.errors import UserError
from shared.evaluation.classifier import (ClassifierRecipe, SmallCNN, accuracy, check_classifier_path, load_classifier,
                                          save_classifier, train_classifier)
from shared.evaluation.frechet import PenultimateFeatures, frechet_distance
from shared.evaluation.inception_score import classifier_inception_score


def split_real(images: torch.Tensor, labels: torch.Tensor, heldout: int) -> tuple[tuple, tuple]:
    """((train images, labels), (held-out images, labels)): the last `heldout` images are held out."""
    if not 0 < heldout < images.shape[0]:
        raise UserError(f"--heldout must lie in [1, {images.shape[0] - 1}] for {images.shape[0]} images, got {heldout}")
    train, held = (slice(r.start, r.stop) for r in judge_split(images.shape[0], heldout))
    return (images[train], labels[train]), (images[held], labels[held])


def stack_dataset(dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, label) pairs of a Dataset as tensors [N x C x H x W], [N]."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):  # TensorImageDataset: no per-item loop
        return from_uint8(dataset.images[:n]), dataset.labels[:n].long()
    pairs = [dataset[i] for i in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


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

    def real_images(self, count: int, seed: int = 0) -> torch.Tensor:
        """`count` random classifier-train images [count x C x H x W]: the real twin of a generated run."""
        gen = torch.Generator().manual_seed(seed)
        return self.train_images[torch.randperm(self.train_images.shape[0], generator=gen)[:count]]

    def floor(self, count: int, seed: int = 0) -> float:
        """The real-vs-real FD at `count` images: real_images(count, seed) against the held-out set."""
        return frechet_distance(self.feature, self.heldout_images, self.real_images(count, seed))

    def real_inception_score(self, count: int, seed: int = 0) -> float:
        """The classifier Inception Score of the same real images the FD floor uses."""
        return classifier_inception_score(self.classifier, self.real_images(count, seed))


@dataclass(frozen=True)
class JudgeSource:
    """Where a judge's real images and classifier come from: the dataset (its last `heldout` images are
    held out) and the classifier file (None: train one and keep it in memory only)."""
    dataset: str
    data_dir: str | None
    classifier_path: str | None
    heldout: int


def prepare_judge(source: JudgeSource, image_shape: Sequence[int], num_classes: int, device: torch.device,
                  recipe: ClassifierRecipe = ClassifierRecipe(), progress: bool = True) -> Judge:
    """Loads the real data, splits off the held-out images, and loads the classifier from
    source.classifier_path or trains one on the rest by `recipe` (saving it there when a path is given,
    before returning). image_shape [C, H, W] and num_classes: what the model under test makes."""
    dataset, data_dir, classifier_path, heldout = source.dataset, source.data_dir, source.classifier_path, source.heldout
    if classifier_path is not None:
        check_classifier_path(classifier_path)  # a directory or a file-as-parent fails before the data load

    data = load_dataset(dataset, data_dir=data_dir, train=True, image_size=int(image_shape[-1]),
                        channels=int(image_shape[0]), quiet=True)
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
        classifier = train_classifier(train_x, train_y, classes, recipe, device, progress)
        source = "trained now"
        if classifier_path is not None:
            save_classifier(classifier, classifier_path, {"dataset": dataset, "heldout": heldout, "epochs": recipe.epochs,
                                                          "shift_pixels": recipe.shift_pixels})
            source = f"{classifier_path} (trained now)"
    return Judge(classifier, train_x, held_x, held_y, source)
