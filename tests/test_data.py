"""Data loading from generated IDX files and image folders, and the missing-data errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from shared.data.datasets import DataError, DatasetInfo, load_dataset
from tests.idx_files import make_mnist_dir, write_idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_values_and_scaling(tmp_path, gz):
    images, labels = make_mnist_dir(tmp_path, num=12, split="train", gz=gz)
    ds = load_dataset("mnist", str(tmp_path))
    assert len(ds) == 12 and ds.info.split == "train" and ds.info.image_shape == (1, 28, 28)
    x, y = ds[5]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[5]
    torch.testing.assert_close(x[0], torch.from_numpy(images[5]).float() / 127.5 - 1)
    assert x.min() >= -1 and x.max() <= 1


def test_test_split_only_folder_says_so_once(tmp_path, capsys):
    make_mnist_dir(tmp_path, num=7, split="t10k")
    ds = load_dataset("fashion-mnist", str(tmp_path))
    assert ds.info.split == "test" and len(ds) == 7
    err = capsys.readouterr().err
    assert err.count("using the test split") == 1


def test_torchvision_layout_under_root(tmp_path):
    make_mnist_dir(tmp_path / "MNIST" / "raw", num=5, split="train")
    assert len(load_dataset("mnist", root=str(tmp_path), download=False)) == 5


def test_missing_data_error_names_files_and_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", root=str(tmp_path), download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path) in msg and "--data-dir" in msg
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", str(tmp_path / "nope"))


def test_corrupt_idx_is_a_clear_error(tmp_path):
    make_mnist_dir(tmp_path, num=4, split="train", gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("mnist", str(tmp_path))
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4,), np.uint8), gz=False)  # wrong kind
    with pytest.raises(DataError, match="expected kind"):
        load_dataset("mnist", str(tmp_path))


def test_image_folder(tmp_path):
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 24), rgb).save(tmp_path / name / f"{i}.png")
    ds = load_dataset("folder", str(tmp_path), image_size=16)
    assert len(ds) == 6 and ds.info.num_classes == 2 and ds.info.image_shape == (3, 16, 16)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0  # classes sorted: blue = 0
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("folder")
    with pytest.raises(DataError, match="holds no images"):
        load_dataset("folder", str(tmp_path))
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("svhn")


def test_dataset_info_records_class_names_and_a_note_only_when_set():
    plain = DatasetInfo("mnist", "train", 10, (1, 28, 28), "x").to_dict()
    assert "class_names" not in plain and "note" not in plain
    named = DatasetInfo("cifar10", "test", 2, (3, 32, 32), "y", ("cat", "dog"), "JPEG copy").to_dict()
    assert named["class_names"] == ["cat", "dog"] and named["note"] == "JPEG copy" and named["split"] == "test"


def test_every_dataset_name_is_offered_when_one_is_unknown():
    with pytest.raises(DataError) as err:
        load_dataset("cifar100")
    assert all(name in str(err.value) for name in ("mnist", "fashion-mnist", "cifar10", "folder"))
