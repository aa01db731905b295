"""Fashion-MNIST offline: the IDX files of --data-dir, or without it Debian's dataset-fashion-mnist folder
(SYSTEM_DIRS); the one line that says how to get it when it is nowhere; no flips by default; the judge
table of the MNIST family. On a machine with the package installed, its files are read whole."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import shared.data.datasets as data_module
from shared.data.datasets import DataError, load_dataset, without_judge_heldout
from shared.evaluation.classifier import SmallCNN, recipe_for
from shared.evaluation.judge import JudgeSource, prepare_judge
from shared.training.config import TrainConfig
from tests.idx_files import make_mnist_dir

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def system_dir(tmp_path, monkeypatch):
    """A stand-in for Debian's folder, holding generated IDX files; returns (folder, images, labels)."""
    folder = tmp_path / "usr-share-datasets-fashion-mnist"
    images, labels = make_mnist_dir(folder, num=30, split="train", gz=True, seed=3)
    monkeypatch.setitem(data_module.SYSTEM_DIRS, "fashion-mnist", folder)
    return folder, images, labels


def test_without_data_dir_the_debian_folder_is_read(system_dir, tmp_path):
    folder, images, labels = system_dir
    ds = load_dataset("fashion-mnist", root=str(tmp_path / "empty-root"), download=False)
    assert len(ds) == 30 and ds.info.name == "fashion-mnist" and ds.info.split == "train"
    assert Path(ds.info.source).parent == folder
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))


def test_the_root_comes_before_the_debian_folder(system_dir, tmp_path):
    make_mnist_dir(tmp_path / "root", num=12, split="train", seed=9)
    assert len(load_dataset("fashion-mnist", root=str(tmp_path / "root"), download=False)) == 12


def test_an_explicit_data_dir_is_the_only_place_looked_in(system_dir, tmp_path):
    (tmp_path / "given").mkdir()
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", str(tmp_path / "given"))
    assert str(system_dir[0]) not in str(err.value) and str(tmp_path / "given") in str(err.value)


def test_missing_everywhere_is_one_line_saying_how_to_get_it(tmp_path, monkeypatch):
    absent = tmp_path / "not-installed"
    monkeypatch.setitem(data_module.SYSTEM_DIRS, "fashion-mnist", absent)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", root=str(tmp_path / "root"), download=False)
    line = str(err.value)
    assert "\n" not in line and "apt-get install dataset-fashion-mnist" in line and "--data-dir" in line
    assert str(absent) in line and "train-images-idx3-ubyte" in line


def test_mnist_does_not_look_in_the_fashion_folder(system_dir, tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", root=str(tmp_path / "root"), download=False)
    assert "apt-get" not in str(err.value) and str(system_dir[0]) not in str(err.value)


def test_no_flips_by_default():
    assert TrainConfig(dataset="fashion-mnist").random_flip is False


def test_the_judge_is_the_mnist_family_one(tmp_path):
    make_mnist_dir(tmp_path, num=60, split="train", seed=1)
    ds = load_dataset("fashion-mnist", str(tmp_path))
    kept, excluded = without_judge_heldout(ds, heldout=20)
    assert len(kept) == 40 and excluded == 20  # the last 20 of the train split, as for MNIST
    judge = prepare_judge(JudgeSource("fashion-mnist", str(tmp_path), None, heldout=20), (1, 28, 28), 10,
                          torch.device("cpu"), recipe_for("fashion-mnist", epochs=1), progress=False)
    assert isinstance(judge.classifier, SmallCNN) and judge.heldout_images.shape[0] == 20
    assert torch.equal(judge.heldout_labels, ds.labels[-20:]) and judge.data_note == ""


@pytest.mark.skipif(not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_the_installed_package_reads_whole():
    """The published split sizes: 60,000 training and 10,000 test images, 6,000 and 1,000 per class."""
    train = load_dataset("fashion-mnist", root="/nonexistent-root", download=False, quiet=True)
    test = load_dataset("fashion-mnist", root="/nonexistent-root", train=False, download=False, quiet=True)
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert Path(train.info.source).parent == DEBIAN_DIR
