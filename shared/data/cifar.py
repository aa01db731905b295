"""CIFAR-10 from JPEG files, offline: the zips as they are (`cifar10-train.zip`, `cifar10-test.zip`,
members `<split>/<class>/NNNN.jpg`) or the same tree unpacked (`DIR/<split>/<class>/*.jpg`).

    find_cifar10(folder, split)      where a split lives in a folder: its zip, its unpacked tree, or None
    load_cifar10(source, quiet)      the split as uint8 [N x 3 x 32 x 32] in a TensorImageDataset
    CIFAR10_CLASSES                  the folder names; label k is CIFAR10_CLASSES[k] (the official order,
                                     which is alphabetical, as an ImageFolder would number them)

Every image is decoded once, when the split is loaded (25,000 images take a few seconds, with a
progress bar), and must be a 32×32 image: a member outside the layout, a class without images, a
damaged JPEG or an image of another size is one DataError naming the zip (or folder) and the file,
raised before anything is trained or written. Labels are the class folders, sorted by (class, file name).

Pixels from JPEGs (quality about 75) are close to, not identical with, the official CIFAR-10 arrays:
an FID against them compares runs of this project, not with published CIFAR-10 FIDs (JPEG_COPY_NOTE,
which DatasetInfo.note carries into options.json and the judge's report).
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.data.base import DataError, DatasetInfo, TensorImageDataset, progress_bar, unreadable_message

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_SHAPE = (3, 32, 32)   # C x H x W
SPLITS = ("train", "test")
JPEG_COPY_NOTE = ("CIFAR-10 as JPEG files (quality about 75): Fréchet distances against these images compare "
                  "runs of this project, not with published CIFAR-10 FIDs")


def zip_name(split: str) -> str:
    return f"cifar10-{split}.zip"


@dataclass(frozen=True)
class CifarSource:
    """One split on disk: kind "zip" (path is the zip file) or "tree" (path is the <split> folder)."""
    split: str
    kind: str
    path: Path


def find_cifar10(folder: Path, split: str) -> CifarSource | None:
    """The split's zip (`cifar10-<split>.zip`) in folder, else its unpacked tree (`<split>/`), else None."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if (folder / zip_name(split)).is_file():
        return CifarSource(split, "zip", folder / zip_name(split))
    if (folder / split).is_dir():
        return CifarSource(split, "tree", folder / split)
    return None


def load_cifar10(source: CifarSource, quiet: bool = False) -> TensorImageDataset:
    """The split as a TensorImageDataset of uint8 images [N x 3 x 32 x 32] and labels [N] in 0..9."""
    if source.kind == "zip":
        pixels, labels = _decode_zip(source.path, source.split, quiet)
    else:
        pixels, labels = _decode_tree(source.path, quiet)
    info = DatasetInfo("cifar10", source.split, len(CIFAR10_CLASSES), CIFAR10_SHAPE, str(source.path.resolve()),
                       CIFAR10_CLASSES, JPEG_COPY_NOTE)
    return TensorImageDataset(torch.from_numpy(pixels), torch.from_numpy(labels), info)


def zip_members(archive: zipfile.ZipFile, path: Path, split: str) -> tuple[list[str], list[int]]:
    """(member names, labels) of the images of a CIFAR-10 zip, sorted by (class, name).

    Folders and hidden entries (a leading dot, macOS's __MACOSX/) are skipped; any other member that is
    not `<split>/<class>/<file>` with one of the ten classes, and a class without images, is a DataError.
    """
    layout = f"{split}/<class>/<file> with the classes {', '.join(CIFAR10_CLASSES)}"
    by_class: dict[str, list[str]] = {name: [] for name in CIFAR10_CLASSES}
    for name in archive.namelist():
        parts = name.split("/")
        if name.endswith("/") or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):
            continue
        if len(parts) != 3 or parts[0] != split or parts[1] not in by_class:
            raise DataError(f"{path}: member {name!r} is not in the CIFAR-10 layout ({layout})")
        by_class[parts[1]].append(name)
    empty = [name for name, members in by_class.items() if not members]
    if empty:
        raise DataError(f"{path} holds no images of class {', '.join(empty)} (expected {layout})")
    members = [name for cls in CIFAR10_CLASSES for name in sorted(by_class[cls])]
    labels = [k for k, cls in enumerate(CIFAR10_CLASSES) for _ in by_class[cls]]
    return members, labels


def _decode_zip(path: Path, split: str, quiet: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} is not a readable zip file ({_reason(err)})") from None
    with archive:
        members, labels = zip_members(archive, path, split)
        pixels = np.empty((len(members), *CIFAR10_SHAPE), dtype=np.uint8)
        for i, name in enumerate(progress_bar(len(members), quiet)(members, f"decoding {path.name}")):
            where = f"{path}: {name}"
            try:
                data = archive.read(name)
            except (zipfile.BadZipFile, OSError, EOFError) as err:  # a CRC mismatch, a cut-off archive
                raise DataError(f"{where} cannot be read from the zip ({_reason(err)})") from None
            pixels[i] = decode_cifar_image(data, where)
    return pixels, np.asarray(labels, dtype=np.int64)


def tree_files(folder: Path) -> tuple[list[Path], list[int]]:
    """(files, labels) of an unpacked split, folder/<class>/<file>, sorted by (class, name); hidden entries
    are skipped. Exactly the ten class folders, each with at least one file, or a DataError."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise DataError(f"cannot list {folder}: {err.strerror}") from None
    names = tuple(p.name for p in entries)
    if names != CIFAR10_CLASSES or not all(p.is_dir() for p in entries):
        raise DataError(f"{folder} holds {', '.join(names) or 'nothing'}; a CIFAR-10 split holds one folder per "
                        f"class and nothing else: {', '.join(CIFAR10_CLASSES)}")
    files, labels = [], []
    for label, class_dir in enumerate(entries):
        found = sorted(p for p in class_dir.iterdir() if not p.name.startswith(".") and p.is_file())
        if not found:
            raise DataError(f"class folder {class_dir} holds no images")
        files += found
        labels += [label] * len(found)
    return files, labels


def _decode_tree(folder: Path, quiet: bool) -> tuple[np.ndarray, np.ndarray]:
    files, labels = tree_files(folder)
    pixels = np.empty((len(files), *CIFAR10_SHAPE), dtype=np.uint8)
    for i, path in enumerate(progress_bar(len(files), quiet)(files, f"decoding {folder.name}/")):
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {path} ({err.strerror or type(err).__name__})") from None
        pixels[i] = decode_cifar_image(data, str(path))
    return pixels, np.asarray(labels, dtype=np.int64)


def decode_cifar_image(data: bytes, where: str) -> np.ndarray:
    """uint8 [3 x 32 x 32] RGB pixels of one encoded image; a DataError naming `where` when it is not a
    readable image or not 32×32 (CIFAR-10 images are never resized: another size is another dataset)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if size == CIFAR10_SHAPE[1:]:
                rgb = np.asarray(image.convert("RGB"))  # decodes the whole file: damage shows here
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError… for a damaged file
        raise DataError(unreadable_message(where, err)) from None
    if size != CIFAR10_SHAPE[1:]:
        raise DataError(f"{where} is {size[0]}×{size[1]} pixels; CIFAR-10 images are 32×32")
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _reason(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
