"""The judge: a classifier with the real images it is measured against.

`prepare_judge` loads the dataset, splits off the held-out images, and loads the classifier from its file
or trains one on the other images and saves it there before any sampling starts, so a later failure never
loses it. The held-out images are the last `heldout` of the train split (`shared.data.datasets.judge_split`,
the one split definition) for the MNIST family and image folders, and the whole test split for a dataset
that has one of its own (JUDGED_ON_TEST_SPLIT: CIFAR-10). A `Judge` then scores samples: classifier
accuracy on the held-out images, the FD floor (classifier-train images against the held-out ones) and the
real-data Inception Score at a given sample count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from shared.data.datasets import DATASET_NAMES, JUDGED_ON_TEST_SPLIT, from_uint8, judge_split, load_dataset
from shared.errors import UserError
from shared.evaluation.classifier import (ClassifierRecipe, accuracy, architecture_name, check_classifier_path,
                                          load_classifier, recipe_for, save_classifier, train_classifier)
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
    heldout_images / heldout_labels (the last `heldout` images, or the test split), accuracy (on the
    held-out images), source (the classifier file, and whether it was trained now), data_note.
    """

    def __init__(self, classifier: nn.Module, train_images, heldout_images, heldout_labels, source: str,
                 data_note: str = ""):
        self.classifier, self.feature = classifier, PenultimateFeatures(classifier)
        self.train_images, self.heldout_images, self.heldout_labels = train_images, heldout_images, heldout_labels
        self.accuracy = accuracy(classifier, heldout_images, heldout_labels)
        self.source = source
        self.data_note = data_note  # what the real images are, when it matters (DatasetInfo.note)

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
    held out, or its test split for JUDGED_ON_TEST_SPLIT) and the classifier file (None: train one and keep
    it in memory only)."""
    dataset: str
    data_dir: str | None
    classifier_path: str | None
    heldout: int


def real_splits(source: JudgeSource, image_shape: Sequence[int], progress: bool) -> tuple[tuple, tuple, object]:
    """((classifier-train images, labels), (held-out images, labels), the train split's DatasetInfo), images
    [N x C x H x W] in [−1, 1]: the test split held out where the dataset has one (JUDGED_ON_TEST_SPLIT),
    else the last source.heldout images of the train split."""
    own_test_split = source.dataset in JUDGED_ON_TEST_SPLIT

    def load(train: bool):  # a progress bar for CIFAR-10's JPEG decode; the other datasets load quietly here
        data = load_dataset(source.dataset, data_dir=source.data_dir, train=train, image_size=int(image_shape[-1]),
                            channels=int(image_shape[0]), quiet=not (progress and own_test_split))
        images, labels = stack_dataset(data)
        check_dataset_matches(images, image_shape, f"--dataset {source.dataset}")
        return (images, labels), data.info

    (images, labels), info = load(train=True)
    if own_test_split:
        return (images, labels), load(train=False)[0], info
    return (*split_real(images, labels, source.heldout), info)


def _load_checked(source: JudgeSource, image_shape: Sequence[int], device: torch.device) -> nn.Module:
    """The classifier of source.classifier_path, refused in one line when it is for other images or another
    dataset (an MNIST judge would score Fashion-MNIST samples without complaint)."""
    path = source.classifier_path
    classifier, meta = load_classifier(path, device)
    if classifier.config["image_size"] != image_shape[-1] or classifier.config["in_channels"] != image_shape[0]:
        raise UserError(f"classifier {path!r} is for {classifier.config['in_channels']} x "
                        f"{classifier.config['image_size']}² images, the model makes {tuple(image_shape)}")
    trained_on = meta.get("dataset")
    if trained_on in DATASET_NAMES and trained_on != source.dataset:  # (a name of ours: not a test's own data)
        raise UserError(f"classifier {path!r} was trained on {trained_on}, not {source.dataset}; give "
                        f"--classifier another file (it is trained there)")
    return classifier


def prepare_judge(source: JudgeSource, image_shape: Sequence[int], num_classes: int, device: torch.device,
                  recipe: ClassifierRecipe | None = None, progress: bool = True) -> Judge:
    """Loads the real data, splits off the held-out images, and loads the classifier from
    source.classifier_path or trains one on the rest by `recipe` (None: the dataset's, recipe_for) and
    saves it there when a path is given, before returning. image_shape [C, H, W] and num_classes: what
    the model under test makes."""
    if source.classifier_path is not None:
        check_classifier_path(source.classifier_path)  # a directory or a file-as-parent fails before the data load
    recipe = recipe_for(source.dataset) if recipe is None else recipe
    (train_x, train_y), (held_x, held_y), info = real_splits(source, image_shape, progress)
    path = source.classifier_path
    if path is not None and Path(path).exists():
        classifier, trained = _load_checked(source, image_shape, device), f"{path} (loaded)"
    else:
        classes = max(num_classes, int(train_y.max()) + 1)
        classifier = train_classifier(train_x, train_y, classes, recipe, device, progress)
        trained = "trained now"
        if path is not None:
            save_classifier(classifier, path, {"dataset": source.dataset, "heldout": int(held_x.shape[0]),
                                               "epochs": recipe.epochs, "shift_pixels": recipe.shift_pixels,
                                               "arch": architecture_name(classifier), "flip": recipe.flip})
            trained = f"{path} (trained now)"
    return Judge(classifier, train_x, held_x, held_y, trained, info.note)
