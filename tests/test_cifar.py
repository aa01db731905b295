"""CIFAR-10 from generated JPEG zips and unpacked trees: the pixels and labels against the images that
were written, the dispatch of --dataset cifar10, the flip default, the training split (no judge cut),
every bad file as one error line with nothing written, and the CIFAR-10 judge (ResNet classifier, the
test split held out, the floor against the train split)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.data.cifar import CIFAR10_CLASSES, JPEG_COPY_NOTE, find_cifar10, load_cifar10
from shared.data.datasets import DataError, load_dataset, without_judge_heldout
from shared.errors import UserError
from shared.evaluation.classifier import (CIFAR_RECIPE, CifarResNet, SmallCNN, load_classifier, recipe_for,
                                          save_classifier, train_classifier)
from shared.evaluation.judge import JudgeSource, prepare_judge
from shared.training.config import TrainConfig, parse_config
from tests.idx_files import make_mnist_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ROOT / "stage3_train" / "train.py"
EVALUATE = ROOT / "stage5_guidance" / "evaluate.py"
# JPEG at quality 100 without chroma subsampling, on flat 8×8 blocks aligned with its DCT blocks: the
# decoded pixels stay within a few levels of those written (colour conversion and rounding only).
JPEG_TOLERANCE = 3
BLOCK = 8


def block_image(label: int, index: int, size: tuple = (32, 32)) -> np.ndarray:
    """[H x W x 3] uint8: flat BLOCK × BLOCK squares whose colours depend on (label, index), so every image differs."""
    rng = np.random.default_rng(1000 * label + index)
    blocks = rng.integers(0, 256, size=(size[1] // BLOCK + 1, size[0] // BLOCK + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, BLOCK, axis=0), BLOCK, axis=1)[:size[1], :size[0]].copy()


def jpeg_bytes(pixels: np.ndarray, quality: int = 100) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def make_cifar_zip(folder: Path, split: str, per_class: int, members: dict | None = None) -> dict:
    """Writes folder/cifar10-<split>.zip (stored, like the real ones) with per_class images of each class;
    `members` adds or replaces members by name (bytes). Returns {member name: (label, pixels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {f"{split}/{cls}/{i:04d}.jpg": (k, block_image(k, i)) for k, cls in enumerate(CIFAR10_CLASSES)
               for i in range(per_class)}
    contents = {name: jpeg_bytes(pixels) for name, (_, pixels) in written.items()}
    contents.update(members or {})
    with zipfile.ZipFile(folder / f"cifar10-{split}.zip", "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(contents, reverse=True):  # the reader sorts; write out of order to check it
            archive.writestr(name, contents[name])
    return {name: written[name] for name in written if name in contents and (members or {}).get(name) is None}


def unpack(folder: Path, split: str) -> Path:
    target = folder / "unpacked"
    with zipfile.ZipFile(folder / f"cifar10-{split}.zip") as archive:
        archive.extractall(target)
    return target


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        fn(*args, **kwargs)
    text = str(err.value)
    assert "\n" not in text and text
    return text


# --------------------------------------------------------------------------------------------------
# Reading

def test_zip_pixels_and_labels_are_the_images_written(tmp_path):
    written = make_cifar_zip(tmp_path, "train", per_class=3)
    ds = load_dataset("cifar10", str(tmp_path))
    assert len(ds) == 30 and ds.info.split == "train" and ds.info.image_shape == (3, 32, 32)
    assert ds.info.class_names == CIFAR10_CLASSES and ds.info.num_classes == 10
    assert ds.info.note == JPEG_COPY_NOTE and ds.info.to_dict()["note"] == JPEG_COPY_NOTE
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (30, 3, 32, 32)
    for i, name in enumerate(sorted(written)):  # sorted by (class, file name): class names sort alphabetically
        label, pixels = written[name]
        assert int(ds.labels[i]) == label == CIFAR10_CLASSES.index(name.split("/")[1])
        diff = np.abs(ds.images[i].numpy().transpose(1, 2, 0).astype(int) - pixels.astype(int))
        assert diff.max() <= JPEG_TOLERANCE, (name, diff.max())
    x, y = ds[4]
    torch.testing.assert_close(x, ds.images[4].float() / 127.5 - 1, atol=0, rtol=0)


def test_unpacked_tree_reads_the_same_as_the_zip(tmp_path):
    make_cifar_zip(tmp_path / "zips", "test", per_class=2)
    tree_root = unpack(tmp_path / "zips", "test")
    (tree_root / "test" / "cat" / ".DS_Store").write_bytes(b"\x00")  # hidden files are not images
    from_zip = load_dataset("cifar10", str(tmp_path / "zips"), train=False)
    from_tree = load_dataset("cifar10", str(tree_root), train=False)
    assert find_cifar10(tree_root, "test").kind == "tree" and from_tree.info.split == "test"
    assert torch.equal(from_zip.images, from_tree.images) and torch.equal(from_zip.labels, from_tree.labels)


def test_the_zip_wins_over_a_tree_and_each_split_is_its_own(tmp_path):
    make_cifar_zip(tmp_path, "train", per_class=2)
    make_cifar_zip(tmp_path, "test", per_class=1)
    assert find_cifar10(tmp_path, "train").kind == "zip"
    assert len(load_dataset("cifar10", str(tmp_path))) == 20
    assert len(load_dataset("cifar10", str(tmp_path), train=False)) == 10


def test_without_data_dir_the_root_and_root_cifar10_are_searched(tmp_path):
    make_cifar_zip(tmp_path / "cifar10", "train", per_class=1)
    ds = load_dataset("cifar10", root=str(tmp_path), download=False)
    assert len(ds) == 10 and ds.info.source.endswith("cifar10-train.zip")


def test_the_judge_split_is_not_cut_from_cifar(tmp_path):
    """CIFAR-10's judge holds out the test split, so training keeps every train image (its last 2,000
    would be whole classes: the zip is sorted by class)."""
    make_cifar_zip(tmp_path, "train", per_class=3)
    ds = load_dataset("cifar10", str(tmp_path))
    kept, excluded = without_judge_heldout(ds, heldout=5)
    assert kept is ds and excluded == 0


# --------------------------------------------------------------------------------------------------
# Bad files: one line naming the file, before anything is written

def test_a_damaged_jpeg_member_is_one_line_naming_it(tmp_path):
    good = jpeg_bytes(block_image(3, 0))
    make_cifar_zip(tmp_path, "train", 1, {"train/cat/0000.jpg": good[:len(good) // 2]})
    text = one_line_error(load_dataset, "cifar10", str(tmp_path))
    assert "train/cat/0000.jpg" in text and "not a readable image" in text
    make_cifar_zip(tmp_path, "train", 1, {"train/dog/0000.jpg": b"not a jpeg at all"})
    text = one_line_error(load_dataset, "cifar10", str(tmp_path))
    assert "train/dog/0000.jpg" in text and "not an image" in text


def test_an_image_of_another_size_is_refused(tmp_path):
    make_cifar_zip(tmp_path, "train", 1, {"train/ship/0000.jpg": jpeg_bytes(block_image(8, 0, size=(33, 32)))})
    text = one_line_error(load_dataset, "cifar10", str(tmp_path))
    assert "train/ship/0000.jpg" in text and "33×32" in text and "32×32" in text


def test_a_class_without_images_is_refused(tmp_path):
    archive_dir = tmp_path / "zip"
    make_cifar_zip(archive_dir, "train", 1)
    with zipfile.ZipFile(archive_dir / "cifar10-train.zip") as src:
        kept = {n: src.read(n) for n in src.namelist() if "/frog/" not in n}
    with zipfile.ZipFile(archive_dir / "cifar10-train.zip", "w") as dst:
        for name, data in kept.items():
            dst.writestr(name, data)
    assert "class frog" in one_line_error(load_dataset, "cifar10", str(archive_dir))
    make_cifar_zip(tmp_path / "z2", "train", 1)
    tree = unpack(tmp_path / "z2", "train")
    for f in (tree / "train" / "horse").iterdir():
        f.unlink()
    text = one_line_error(load_dataset, "cifar10", str(tree))
    assert "class folder" in text and "horse" in text and "holds no images" in text


def test_a_zip_without_the_layout_is_refused(tmp_path):
    make_cifar_zip(tmp_path, "train", 1, {"cifar10/train/cat/0001.jpg": jpeg_bytes(block_image(3, 1))})
    text = one_line_error(load_dataset, "cifar10", str(tmp_path))
    assert "cifar10/train/cat/0001.jpg" in text and "layout" in text
    make_cifar_zip(tmp_path, "train", 1, {"train/zebra/0000.jpg": jpeg_bytes(block_image(0, 9))})
    assert "train/zebra/0000.jpg" in one_line_error(load_dataset, "cifar10", str(tmp_path))
    make_cifar_zip(tmp_path, "train", 1, {"test/cat/0000.jpg": jpeg_bytes(block_image(3, 0))})  # the other split
    assert "test/cat/0000.jpg" in one_line_error(load_dataset, "cifar10", str(tmp_path))
    make_cifar_zip(tmp_path / "tree", "train", 1)
    tree = unpack(tmp_path / "tree", "train")
    (tree / "train" / "unicorn").mkdir()
    assert "unicorn" in one_line_error(load_dataset, "cifar10", str(tree))


def test_a_file_that_is_not_a_zip_and_a_missing_split(tmp_path):
    (tmp_path / "cifar10-train.zip").write_text("plain text")
    text = one_line_error(load_dataset, "cifar10", str(tmp_path))
    assert "cifar10-train.zip" in text and "not a readable zip" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = one_line_error(load_dataset, "cifar10", str(empty))
    assert "cifar10-train.zip" in text and "--data-dir" in text and str(empty) in text
    make_cifar_zip(tmp_path / "only_test", "test", 1)
    text = one_line_error(load_dataset, "cifar10", str(tmp_path / "only_test"))
    assert "only the test split" in text


def test_a_bad_zip_stops_training_with_one_line_and_no_run_directory(tmp_path):
    good = jpeg_bytes(block_image(1, 0))
    make_cifar_zip(tmp_path / "data", "train", 2, {"train/automobile/0001.jpg": good[:200]})
    result = subprocess.run([sys.executable, str(TRAIN), "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                             "--out", str(tmp_path / "runs"), "--preset", "tiny", "--max-steps", "2", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "train/automobile/0001.jpg" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --------------------------------------------------------------------------------------------------
# Training options

@pytest.mark.parametrize("argv, flip", [(["--dataset", "cifar10"], True),
                                        (["--dataset", "cifar10", "--no-random-flip"], False),
                                        (["--dataset", "mnist"], False),
                                        (["--dataset", "mnist", "--random-flip"], True),
                                        (["--dataset", "fashion-mnist"], False)])
def test_flip_is_on_by_default_for_cifar_only(argv, flip):
    cfg, given, _ = parse_config(argv, "test")
    assert cfg.random_flip is flip
    assert ("random_flip" in given) is any("flip" in a for a in argv)
    assert TrainConfig(dataset="cifar10").random_flip is True and TrainConfig().random_flip is False


def test_a_tiny_cifar_run_trains_with_flips_and_is_judged_on_the_test_split(tmp_path):
    make_cifar_zip(tmp_path / "data", "train", 4)
    result = subprocess.run([sys.executable, str(TRAIN), "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                             "--out", str(tmp_path / "runs"), "--preset", "tiny", "--max-steps", "2", "--batch-size", "8",
                             "--heldout-size", "8", "--sample-steps", "2", "--precision", "fp32", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    record = json.loads(next((tmp_path / "runs").glob("*/options.json")).read_text())
    options = record["options"]
    assert options["random_flip"] is True and options["judge_heldout_excluded"] == 0
    assert record["dataset"]["class_names"] == list(CIFAR10_CLASSES) and record["dataset"]["note"] == JPEG_COPY_NOTE
    assert record["dataset"]["image_shape"] == [3, 32, 32] and record["dataset"]["split"] == "train"
    make_cifar_zip(tmp_path / "data", "test", 2)
    run_dir = next((tmp_path / "runs").iterdir())
    result = subprocess.run([sys.executable, str(EVALUATE), "--checkpoint", str(run_dir), "--dataset", "cifar10",
                             "--data-dir", str(tmp_path / "data"), "--classifier", str(tmp_path / "clf.pt"),
                             "--classifier-epochs", "1", "--no-inception-fid", "--per-class", "2", "--runs", "ddim:2",
                             "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-progress"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "(20 images)" in result.stdout and "FID (Inception): not computed" in result.stdout
    assert "cifar10 test split" in result.stdout and JPEG_COPY_NOTE in result.stdout
    report = json.loads(next((tmp_path / "eval").glob("*/results.json")).read_text())
    assert report["heldout_images"] == 20 and len(report["notes"]) == 3 and "inception_fid" not in report["runs"][0]
    assert load_classifier(tmp_path / "clf.pt")[1]["arch"] == "resnet"


# --------------------------------------------------------------------------------------------------
# The judge

def test_the_resnet_judge_gives_128_d_features_and_survives_its_file(tmp_path):
    torch.manual_seed(0)
    net = CifarResNet(3, 32, 10).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert net.features(x).shape == (5, 128) and net(x).shape == (5, 10)
    path = save_classifier(net, tmp_path / "clf.pt", {"dataset": "cifar10"})
    loaded, meta = load_classifier(path)
    assert isinstance(loaded, CifarResNet) and meta["dataset"] == "cifar10"
    torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)
    with pytest.raises(UserError, match="divisible by 8"):
        train_classifier(torch.zeros(2, 3, 28, 28), torch.zeros(2, dtype=torch.long), 10,
                         recipe_for("cifar10", epochs=1), progress=False)


def test_a_file_without_an_architecture_loads_as_the_small_cnn(tmp_path):
    net = SmallCNN(1, 28, 10).eval()
    path = save_classifier(net, tmp_path / "old.pt", {})
    obj = torch.load(path, weights_only=True)
    del obj["arch"]  # the files written before the ResNet existed
    torch.save(obj, path)
    loaded, _ = load_classifier(path)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert isinstance(loaded, SmallCNN)
    torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)


def test_the_cifar_recipe_learns_colours_with_flips_and_crops():
    """Classes that a colour defines (flips and crops keep it): the ResNet recipe separates them."""
    gen = torch.Generator().manual_seed(0)
    palette = torch.tensor([[0.8, -0.8, -0.8], [-0.8, 0.8, -0.8], [-0.8, -0.8, 0.8], [0.8, 0.8, 0.8]])
    labels = torch.arange(4).repeat(40)
    images = palette[labels].view(-1, 3, 1, 1) + 0.1 * torch.randn(labels.shape[0], 3, 32, 32, generator=gen)
    recipe = recipe_for("cifar10", epochs=10, batch_size=32, lr=0.05, precision="fp32")  # 5 epochs: one class missed on 2 threads
    assert recipe.flip and recipe.arch == "resnet" and recipe.shift_pixels == CIFAR_RECIPE.shift_pixels == 4
    model = train_classifier(images.clamp(-1, 1), labels, 4, recipe, progress=False)
    predicted = model(images.clamp(-1, 1)).argmax(1)
    assert float((predicted == labels).float().mean()) >= 0.95


def test_the_cifar_judge_holds_out_the_test_split(tmp_path):
    make_cifar_zip(tmp_path, "train", 6)
    make_cifar_zip(tmp_path, "test", 2)
    source = JudgeSource("cifar10", str(tmp_path), str(tmp_path / "clf.pt"), heldout=2000)
    judge = prepare_judge(source, (3, 32, 32), 10, torch.device("cpu"),
                          recipe_for("cifar10", epochs=1, batch_size=16, precision="fp32"), progress=False)
    test = load_dataset("cifar10", str(tmp_path), train=False)
    assert judge.heldout_images.shape[0] == 20 and judge.train_images.shape[0] == 60
    torch.testing.assert_close(judge.heldout_images, test.images.float() / 127.5 - 1)
    assert torch.equal(judge.heldout_labels, test.labels)
    assert isinstance(judge.classifier, CifarResNet) and judge.data_note == JPEG_COPY_NOTE
    assert judge.floor(10) >= 0.0
    _, meta = load_classifier(tmp_path / "clf.pt")
    assert meta["dataset"] == "cifar10" and meta["arch"] == "resnet" and meta["heldout"] == 20
    again = prepare_judge(source, (3, 32, 32), 10, torch.device("cpu"), progress=False)
    assert again.source.endswith("(loaded)") and again.accuracy == judge.accuracy


def test_a_judge_for_another_dataset_is_refused(tmp_path):
    make_mnist_dir(tmp_path / "mnist", num=40, split="train")
    clf = tmp_path / "clf.pt"
    prepare_judge(JudgeSource("mnist", str(tmp_path / "mnist"), str(clf), heldout=10), (1, 28, 28), 10,
                  torch.device("cpu"), recipe_for("mnist", epochs=1), progress=False)
    with pytest.raises(UserError, match="trained on mnist, not fashion-mnist"):
        prepare_judge(JudgeSource("fashion-mnist", str(tmp_path / "mnist"), str(clf), heldout=10), (1, 28, 28), 10,
                      torch.device("cpu"), progress=False)
