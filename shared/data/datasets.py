"""Datasets, scaled to [-1, 1]: MNIST, Fashion-MNIST, CIFAR-10 and image folders; `load_dataset` picks the reader.

Offline use: `--data-dir DIR` may point at MNIST-format IDX files (`*-images-idx3-ubyte` with
`*-labels-idx1-ubyte`, gzipped or not), which are read directly, without torchvision. If DIR holds only
the test split (`t10k-*`), that split is used, and a note says so once. Without --data-dir, Fashion-MNIST
is also looked for where Debian's package dataset-fashion-mnist puts it (SYSTEM_DIRS).

CIFAR-10 (shared/data/cifar.py): DIR holds `cifar10-train.zip` / `cifar10-test.zip` (JPEG members
`<split>/<class>/NNNN.jpg`, read as they are), or the same tree unpacked (`DIR/train/<class>/*.jpg`), or
torchvision's `cifar-10-batches-py`. Its judge holds out the test split, so training uses the whole
train split (JUDGED_ON_TEST_SPLIT).

Image folders (`--dataset folder`): DIR holds either images only (an unconditional dataset, no classes) or
one sub-folder of images per class (labels 0 … K−1 by sorted folder name, as torchvision's ImageFolder
numbers them). Every image is converted to grey or RGB, resized so its shorter side is the wanted size and
centre-cropped. A folder whose decoded pixels fit in IN_MEMORY_MAX_BYTES is decoded once into a uint8
tensor (the trainer then keeps it on the device); a larger one is decoded image by image in a DataLoader,
after a check of every file's header. Either way a file that is not a readable image is one error line
naming it, raised while loading, before any training.
"""
from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from shared.data.base import (DataError, DatasetInfo, TensorImageDataset, from_uint8, progress_bar,  # noqa: F401
                              unreadable_message)
from shared.data.cifar import CIFAR10_CLASSES, find_cifar10, load_cifar10, zip_name
from shared.errors import UserError
from shared.model.unet import PRESETS

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10", "folder")
# torchvision's folder names under the root, for the IDX-based datasets.
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}
_CIFAR_BATCHES = "cifar-10-batches-py"   # torchvision's folder of the official python-version batches
_CIFAR_HOW = ("pass --data-dir DIR holding cifar10-train.zip and cifar10-test.zip (such as ../shared/data/cifar10), "
              "or those zips unpacked (DIR/train/<class>/*.jpg), or torchvision's cifar-10-batches-py")
# Where a distribution's package puts a dataset, searched when no --data-dir is given, with its install line.
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
INSTALL_HINTS = {"fashion-mnist": "apt-get install dataset-fashion-mnist (Debian)"}
# Datasets with a test split of their own: the judge holds that split out, so training keeps every train image.
JUDGED_ON_TEST_SPLIT = ("cifar10",)
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


# Image folders whose decoded uint8 pixels (N·C·H·W bytes) fit in this are held in memory whole (and on
# the training device): 1 GiB is 87,000 RGB images of 64×64, or a million of 32×32 grey.
IN_MEMORY_MAX_BYTES = 1 << 30


def load_dataset(name: str, data_dir: str | None = None, root: str = "./data", train: bool = True,
                 download: bool = True, image_size: int = 32, quiet: bool = False, channels: int = 3) -> Dataset:
    """Loads a dataset; the returned Dataset has an `.info` (DatasetInfo).

    name: mnist | fashion-mnist | cifar10 | folder.  data_dir: IDX files, CIFAR-10's zips or unpacked
    tree, or a torchvision root (or, for 'folder', an image folder: images only, or one sub-folder of
    images per class).  root: where to look (and download to) when data_dir is not given; Fashion-MNIST
    also looks in SYSTEM_DIRS, CIFAR-10 also in root/cifar10.  train: the train split, else the test one.
    image_size, channels: the side and the channels (1 grey, 3 RGB) of 'folder' images, which are resized
    and centre-cropped to [channels x image_size x image_size].
    Raises DataError with what was looked for, where, and how to supply it.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} does not exist or is not a directory")
    if name == "folder":
        if data_dir is None:
            raise DataError("--dataset folder needs --data-dir DIR (a folder of images, or one sub-folder of "
                            "images per class)")
        return load_folder(data_dir, image_size, channels, quiet=quiet)
    base = data_dir if data_dir is not None else root
    may_download = download and data_dir is None  # an explicit --data-dir is read, never downloaded into
    if name == "cifar10":
        return _load_cifar10(base, data_dir is None, train, may_download, quiet)
    folders = idx_folders(name, base, search_system=data_dir is None)
    for folder in folders:
        found = find_idx_files(folder, train)
        if found is not None:
            return _load_idx(name, folder, *found, quiet=quiet)
    return _load_torchvision(name, base, train, may_download, tuple(folders))


def idx_folders(name: str, base: str, search_system: bool) -> list[Path]:
    """Where an IDX dataset may lie: base, torchvision's base/<Name>/raw, and (search_system) the
    distribution's folder of SYSTEM_DIRS."""
    folders = [Path(base), Path(base) / _TORCHVISION_FOLDER[name] / "raw"]
    return folders + ([SYSTEM_DIRS[name]] if search_system and name in SYSTEM_DIRS else [])


def _load_cifar10(base: str, search_default: bool, train: bool, download: bool, quiet: bool) -> Dataset:
    """CIFAR-10's split from base (and base/cifar10 when no --data-dir was given): its JPEG zip or
    unpacked tree (shared.data.cifar), else torchvision's python batches, else a download into base."""
    split = "train" if train else "test"
    folders = [Path(base)] + ([Path(base) / "cifar10"] if search_default else [])
    for folder in folders:
        source = find_cifar10(folder, split)
        if source is not None:
            return load_cifar10(source, quiet)
        if (folder / _CIFAR_BATCHES).is_dir():
            return _load_torchvision("cifar10", str(folder), train, download=False)
    if download:
        return _load_torchvision("cifar10", base, train, True, tuple(folders))
    other = "test" if train else "train"
    holds = [str(f) for f in folders if find_cifar10(f, other) is not None]
    found = f" ({', '.join(holds)} holds only the {other} split)" if holds else ""
    raise DataError(f"cifar10 {split} split not found: looked in {', '.join(map(str, folders))} for {zip_name(split)}, "
                    f"{split}/<class>/*.jpg or {_CIFAR_BATCHES}/{found}. To fix: {_CIFAR_HOW}")


def load_training_dataset(cfg, quiet: bool = False) -> Dataset:
    """The training data a TrainConfig names (cfg.dataset read from cfg.data_dir).

    Folder images take cfg.image_size and cfg.channels, by default the preset's image_size and in_channels;
    the other datasets have their own size, and either option with them is an error.
    """
    if cfg.dataset != "folder":
        given = [flag for flag, value in (("--image-size", cfg.image_size), ("--channels", cfg.channels))
                 if value is not None]
        if given:
            raise DataError(f"{' and '.join(given)} apply to --dataset folder; {cfg.dataset} images keep their "
                            f"own size and channels")
        return load_dataset(cfg.dataset, cfg.data_dir, quiet=quiet)
    preset = PRESETS[cfg.preset]
    return load_dataset("folder", cfg.data_dir, image_size=cfg.image_size or preset["image_size"],
                        channels=cfg.channels or preset["in_channels"], quiet=quiet)


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
    An image folder is never split: its file order is sorted by class, so its last images would be whole
    classes rather than a sample of every class. Nor is a dataset of JUDGED_ON_TEST_SPLIT (CIFAR-10),
    whose judge holds out the test split instead.
    """
    n = len(dataset)
    if (heldout <= 0 or not isinstance(dataset, TensorImageDataset) or dataset.info.num_classes < 1 or n <= heldout
            or dataset.info.name == "folder" or dataset.info.name in JUDGED_ON_TEST_SPLIT):
        return dataset, 0
    keep, _ = judge_split(n, heldout)
    return TensorImageDataset(dataset.images[:keep.stop], dataset.labels[:keep.stop], dataset.info), heldout


def _load_torchvision(name: str, root: str, train: bool, download: bool, searched: tuple = ()) -> Dataset:
    """A split through torchvision (its own files under root, downloaded there when `download`); the
    missing-data line names `searched`, the folders already looked in, too."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        base = cls(root=root, train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError… when offline
        raise DataError(_missing_message(name, root, searched, download, err)) from None
    shape = (3, 32, 32) if name == "cifar10" else (1, 28, 28)
    info = DatasetInfo(name, "train" if train else "test", _NUM_CLASSES[name], shape, os.path.abspath(root),
                       CIFAR10_CLASSES if name == "cifar10" else ())
    # The whole split is a uint8 array in memory: serve it as tensors (the trainer gathers on the device).
    pixels = torch.as_tensor(np.asarray(base.data))
    pixels = pixels.permute(0, 3, 1, 2) if pixels.ndim == 4 else pixels.unsqueeze(1)  # CIFAR is N x H x W x C
    labels = torch.as_tensor(np.asarray(base.targets), dtype=torch.long)
    check_labels(labels.numpy(), _NUM_CLASSES[name], root)
    return TensorImageDataset(pixels.contiguous(), labels, info)


def _missing_message(name: str, root: str, searched: tuple, download: bool, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if name == "cifar10":
        looked = f"{', '.join(map(str, searched or (root,)))} for {zip_name('train')} or {_CIFAR_BATCHES}"
        how = _CIFAR_HOW + ", or run once with internet access"
    else:
        looked = (f"{', '.join(map(str, searched or (root,)))} for train-images-idx3-ubyte[.gz] + "
                  f"train-labels-idx1-ubyte[.gz] (or the t10k-* test split)")
        how = "put the IDX files there, pass --data-dir DIR holding them, or run once with internet access"
        if name in INSTALL_HINTS:
            how = f"{INSTALL_HINTS[name]}, or {how}"
    tried = "the download failed" if download else "download was off"
    return f"{name} not found: looked in {looked}; {tried} ({reason}). To fix: {how}."


# --------------------------------------------------------------------------------------------------
# Image folders

class FolderImages(Dataset):
    """Image files decoded on each read: (float32 image [C x S x S] in [-1, 1], int label).

    The DataLoader path for folders too large to hold in memory; the pixels equal those of the in-memory
    path (the same decode_image, the same [-1, 1] formula as TensorImageDataset).
    """

    def __init__(self, files: list[Path], labels: list[int], info: DatasetInfo):
        self.files, self.labels, self.info = files, labels, info

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        channels, size, _ = self.info.image_shape
        pixels = torch.from_numpy(decode_image(self.files[index], size, channels))
        return from_uint8(pixels), self.labels[index]


def load_folder(data_dir: str, image_size: int, channels: int, quiet: bool = False) -> Dataset:
    """An image folder as [channels x image_size x image_size] images: a TensorImageDataset when the decoded
    pixels fit in IN_MEMORY_MAX_BYTES (every file decoded now), else FolderImages (every file's header
    checked now). Unconditional (num_classes 0, labels 0) for a flat folder."""
    if channels not in (1, 3):
        raise DataError(f"folder images have 1 (grey) or 3 (RGB) channels, got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"the folder image size must be a positive integer, got {image_size!r}")
    root = Path(data_dir)
    files, labels, class_names = folder_files(root)
    info = DatasetInfo("folder", "train", len(class_names), (channels, image_size, image_size),
                       str(root.resolve()), tuple(class_names))
    progress = progress_bar(len(files), quiet)
    if len(files) * channels * image_size * image_size <= IN_MEMORY_MAX_BYTES:
        pixels = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
        for i, path in enumerate(progress(files, "decoding images")):
            pixels[i] = decode_image(path, image_size, channels)
        return TensorImageDataset(torch.from_numpy(pixels), torch.tensor(labels, dtype=torch.long), info)
    for path in progress(files, "checking images"):
        check_image_header(path)
    return FolderImages(files, labels, info)


def folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of an image folder, in sorted order; hidden entries are left out.

    A folder of files only: every file, label 0, no classes. A folder of sub-folders only: each sub-folder
    (sorted by name) is a class, holding the files anywhere below it. Both together is an error (which
    would the loose files belong to?), and so is a folder, or a class, without files.
    """
    try:
        entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as err:
        raise DataError(f"cannot list {root}: {err.strerror}") from None
    folders = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file()]
    if not folders and not loose:
        raise DataError(f"{root} holds no images; expected image files (an unconditional dataset) or one "
                        f"sub-folder of images per class")
    if folders and loose:
        raise DataError(f"{root} holds both files ({loose[0].name}, …) and sub-folders ({folders[0].name}, …); "
                        f"put every image in a class sub-folder, or none (an unconditional dataset)")
    if loose:
        return loose, [0] * len(loose), []
    files, labels = [], []
    for label, folder in enumerate(folders):
        found = [Path(parent) / name for parent, dirs, names in sorted(os.walk(folder, followlinks=True))
                 for name in sorted(names) if not name.startswith(".") and not _hidden_below(folder, parent)]
        if not found:
            raise DataError(f"class folder {folder} holds no images")
        files += found
        labels += [label] * len(found)
    return files, labels, [folder.name for folder in folders]


def _hidden_below(top: Path, parent: str) -> bool:
    return any(part.startswith(".") for part in Path(parent).relative_to(top).parts)


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """uint8 pixels [channels x size x size] of the image file at `path`: grey (ITU-R 601-2 luma) or RGB,
    its shorter side resized to `size` and the centre cropped, as guided-diffusion prepares ImageNet
    (Dhariwal & Nichol 2021): halvings with a box filter (an exact area average, so no aliasing) while
    the shorter side is at least twice `size`, then one bicubic resize. Raises DataError naming the file.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")  # drops alpha; decodes the whole file
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError… for a damaged file
        raise DataError(unreadable_message(path, err)) from None
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = np.array(image.crop((left, top, left + size, top + size)))  # (size, size) or (size, size, 3)
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def check_image_header(path: Path) -> None:
    """Whether `path` opens as an image (its header; PNG's chunk checksums too) without decoding it."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:
        raise DataError(unreadable_message(path, err)) from None


def worker_error_line(err: DataError) -> str:
    """The one line of a DataError, also when a DataLoader worker raised it (the main process then gets
    it with 'Caught DataError in DataLoader worker process …' and the worker's traceback as its text)."""
    text = str(err).strip()
    if not text.startswith("Caught "):
        return text
    last = text.splitlines()[-1]  # "shared.data.datasets.DataError: <the line>"
    return last.split(": ", 1)[1] if ": " in last else last


