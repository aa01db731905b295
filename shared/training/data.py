"""Datasets, scaled to [-1, 1]: MNIST, Fashion-MNIST, CIFAR-10 through torchvision, and image folders.

Offline use: `--data-dir DIR` may point at MNIST-format IDX files (`*-images-idx3-ubyte` with
`*-labels-idx1-ubyte`, gzipped or not), which are read directly, without torchvision. If DIR holds only
the test split (`t10k-*`), that split is used, and a note says so once.
"""
from __future__ import annotations

import gzip
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from shared.errors import UserError

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10", "folder")
# torchvision's folder names under the root, for the IDX-based datasets.
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # IDX headers: 0x00000803 and 0x00000801
# The evaluator's held-out images are the last JUDGE_HELDOUT of a dataset (in file order). Training on
# the same files leaves them out, so a Fréchet distance against them measures generalisation.
JUDGE_HELDOUT = 2000


def judge_split(num_images: int, heldout: int = JUDGE_HELDOUT) -> tuple[range, range]:
    """(indices a model may train on, the evaluator's held-out indices) for a dataset of num_images.

    The one split definition that training, the classifier judge and the Fréchet distances share.
    """
    if not 0 < heldout < num_images:
        raise UserError(f"the held-out split must hold between 1 and {num_images - 1} of the {num_images} "
                        f"images, got {heldout}")
    return range(num_images - heldout), range(num_images - heldout, num_images)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(UserError):
    """Data that is missing, unreadable or malformed."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    split: str            # "train" or "test"
    num_classes: int
    image_shape: tuple    # (C, H, W)
    source: str           # where the images were read from

    def to_dict(self) -> dict:
        return {"name": self.name, "split": self.split, "num_classes": self.num_classes,
                "image_shape": list(self.image_shape), "source": self.source}


class TensorImageDataset(Dataset):
    """uint8 images [N x C x H x W] and int labels [N], served as (float32 image in [-1, 1], int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        self.images, self.labels, self.info = images, labels, info

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index].float() / 127.5 - 1.0, int(self.labels[index])


class _TransformedDataset(Dataset):
    """A torchvision dataset of PIL images, converted to [-1, 1] tensors, with DatasetInfo attached."""

    def __init__(self, base, info: DatasetInfo, transform):
        self.base, self.info, self.transform = base, info, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image) * 2.0 - 1.0, int(label)


def load_dataset(name: str, data_dir: str | None = None, root: str = "./data", train: bool = True,
                 download: bool = True, image_size: int = 32, quiet: bool = False) -> Dataset:
    """Loads a dataset; the returned Dataset has an `.info` (DatasetInfo).

    name: mnist | fashion-mnist | cifar10 | folder.  data_dir: IDX files or a torchvision root (or,
    for 'folder', an ImageFolder tree: one sub-folder of images per class).  root: the torchvision
    root when data_dir is not given.  image_size: H = W for 'folder' images (resized, centre-cropped).
    Raises DataError with what was looked for, where, and how to supply it.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} does not exist or is not a directory")
    if name == "folder":
        if data_dir is None:
            raise DataError("--dataset folder needs --data-dir DIR (an image folder with one sub-folder per class)")
        return _load_folder(data_dir, image_size)
    base = data_dir if data_dir is not None else root
    may_download = download and data_dir is None  # an explicit --data-dir is read, never downloaded into
    if name in _TORCHVISION_FOLDER:
        for folder in (Path(base), Path(base) / _TORCHVISION_FOLDER[name] / "raw"):
            found = find_idx_files(folder, train)
            if found is not None:
                return _load_idx(name, folder, *found, quiet=quiet)
    return _load_torchvision(name, base, train, may_download)


def load_training_dataset(cfg, quiet: bool = False) -> Dataset:
    """The training data a TrainConfig names (cfg.dataset read from cfg.data_dir)."""
    return load_dataset(cfg.dataset, cfg.data_dir, quiet=quiet)


def find_idx_files(folder: Path, train: bool = True):
    """(split, images_path, labels_path) for the wanted split in `folder`, else the other split, else None."""
    if not folder.is_dir():
        return None
    order = ("train", "t10k") if train else ("t10k", "train")
    for prefix in order:
        images = _first_existing(folder, f"{prefix}-images-idx3-ubyte")
        labels = _first_existing(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return ("train" if prefix == "train" else "test"), images, labels
    return None


def _first_existing(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Reads one IDX file (gzipped or not) into a uint8 array; the header gives the dimensions."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if len(data) < 8:
        raise DataError(f"{path} is not an IDX file (only {len(data)} bytes)")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic {magic}, expected {expected_magic})")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated or corrupt: header says {dims}, found {payload.size} values")
    return payload.reshape(dims)


def _load_idx(name: str, folder: Path, split: str, images_path: Path, labels_path: Path,
              quiet: bool) -> TensorImageDataset:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} and {labels_path} do not match: {images.shape} images, {labels.shape} labels")
    if split == "test" and not quiet:
        print(f"note: {folder} holds no train split; using the test split ({images.shape[0]:,} images)",
              file=sys.stderr)
    check_labels(labels, _NUM_CLASSES[name], labels_path)
    info = DatasetInfo(name, split, _NUM_CLASSES[name], (1, images.shape[1], images.shape[2]), str(images_path))
    return TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                              info)


def check_labels(labels, num_classes: int, source) -> None:
    """Every label in [0, num_classes): label num_classes is the null class of guidance, and larger
    ones index past the class embedding."""
    labels = np.asarray(labels)
    if labels.size and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DataError(f"{source} holds label {bad}, outside the {num_classes} classes 0..{num_classes - 1}")


def without_judge_heldout(dataset: Dataset, heldout: int) -> tuple[Dataset, int]:
    """(the dataset less the evaluator's held-out images (judge_split), how many were left out).

    Only a labelled in-memory dataset larger than `heldout` is split; any other comes back whole, with 0.
    """
    n = len(dataset)
    if heldout <= 0 or not isinstance(dataset, TensorImageDataset) or dataset.info.num_classes < 1 or n <= heldout:
        return dataset, 0
    keep, _ = judge_split(n, heldout)
    return TensorImageDataset(dataset.images[:keep.stop], dataset.labels[:keep.stop], dataset.info), heldout


def _load_torchvision(name: str, root: str, train: bool, download: bool) -> Dataset:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        base = cls(root=root, train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError… when offline
        raise DataError(_missing_message(name, root, train, download, err)) from None
    shape = (3, 32, 32) if name == "cifar10" else (1, 28, 28)
    info = DatasetInfo(name, "train" if train else "test", _NUM_CLASSES[name], shape, os.path.abspath(root))
    # The whole split is a uint8 array in memory: serve it as tensors (the trainer gathers on the device).
    pixels = torch.as_tensor(np.asarray(base.data))
    pixels = pixels.permute(0, 3, 1, 2) if pixels.ndim == 4 else pixels.unsqueeze(1)  # CIFAR is N x H x W x C
    labels = torch.as_tensor(np.asarray(base.targets), dtype=torch.long)
    check_labels(labels.numpy(), _NUM_CLASSES[name], root)
    return TensorImageDataset(pixels.contiguous(), labels, info)


def _missing_message(name: str, root: str, train: bool, download: bool, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if name == "cifar10":
        looked = f"{os.path.join(root, 'cifar-10-batches-py')} (the python-version CIFAR-10 batches)"
        how = "download cifar-10-python.tar.gz and extract it there, or run once with internet access"
    else:
        folder = os.path.join(root, _TORCHVISION_FOLDER[name], "raw")
        looked = (f"{root} and {folder} for train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz] "
                  f"(or the t10k-* test split)")
        how = "put the IDX files there, pass --data-dir DIR holding them, or run once with internet access"
    tried = "the download failed" if download else "download was off"
    return f"{name} not found: looked in {looked}; {tried} ({reason}). To fix: {how}."


def _load_folder(data_dir: str, image_size: int) -> Dataset:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Lambda(lambda im: im.convert("RGB")),
                                    transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.ToTensor()])
    try:
        base = datasets.ImageFolder(data_dir)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{data_dir} holds no images in class sub-folders ({err}); expected "
                        f"DIR/<class>/<image>{'|'.join(IMAGE_EXTENSIONS[:3])}…") from None
    info = DatasetInfo("folder", "train", len(base.classes), (3, image_size, image_size), os.path.abspath(data_dir))
    return _TransformedDataset(base, info, transform)
