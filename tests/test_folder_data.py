"""Image folders (--dataset folder) on generated images with known pixels: flat folders are unconditional,
class sub-folders are labelled by sorted name, --image-size and --channels give the pixels a numpy
computation predicts, --random-flip mirrors exactly the images its seeded stream says (without a host
sync, resuming exactly), and a damaged or non-image file is one error line naming it."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import shared.data.datasets as data_module
from shared.records.checkpoint import LAST_NAME, load_checkpoint
from shared.records.runs import read_log
from shared.training.batches import FLIP_SEED_OFFSET, Batches
from shared.training.config import TrainConfig
from shared.data.datasets import (DataError, FolderImages, TensorImageDataset, load_dataset, load_training_dataset,
                                  without_judge_heldout)
from shared.training.loop import train
from tests.stage3_helpers import ItemsOnly, edge_bar_dataset, one_thread, run_train  # noqa: F401 (autouse fixture)
from tests.test_training_hot_loop import HostSyncCounter

CPU = torch.device("cpu")


def random_pixels(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def save(array: np.ndarray, path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def as_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [C x H x W] → the float [-1, 1] values the datasets serve."""
    return torch.from_numpy(pixels).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# Layouts

def test_flat_folder_is_unconditional_with_exact_pixels(tmp_path):
    images = [random_pixels((16, 16, 3), seed) for seed in range(5)]
    for i, image in enumerate(images):
        save(image, tmp_path / f"img{i}.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are not images of the dataset
    ds = load_dataset("folder", str(tmp_path), image_size=16, channels=3)
    assert len(ds) == 5 and ds.info.num_classes == 0 and ds.info.image_shape == (3, 16, 16)
    assert ds.info.class_names == () and "class_names" not in ds.info.to_dict()
    for i, image in enumerate(images):  # already 16×16: no resampling, so exact
        x, y = ds[i]
        assert y == 0 and x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
        torch.testing.assert_close(x, as_unit(image.transpose(2, 0, 1)), atol=0, rtol=0)


def test_class_subfolders_are_labelled_by_sorted_name_as_imagefolder_does(tmp_path):
    from torchvision.datasets import ImageFolder

    layout = {"zebra": 2, "apple": 3, "mango": 1, "mango/nested": 2}
    for k, (folder, count) in enumerate(layout.items()):
        for i in range(count):
            save(np.full((8, 8, 3), 10 * k + i, dtype=np.uint8), tmp_path / folder / f"{i}.png")
    ds = load_dataset("folder", str(tmp_path), image_size=8)
    reference = ImageFolder(str(tmp_path))
    assert ds.info.class_names == tuple(reference.classes) == ("apple", "mango", "zebra")
    assert ds.info.num_classes == 3 and len(ds) == len(reference) == 8
    assert ds.info.to_dict()["class_names"] == ["apple", "mango", "zebra"]
    for i, (path, label) in enumerate(reference.samples):  # the same files, in the same order, same labels
        x, y = ds[i]
        assert y == label
        torch.testing.assert_close(x, as_unit(np.array(Image.open(path)).transpose(2, 0, 1)), atol=0, rtol=0)


def test_image_size_64_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    """A 192×128 image of constant 2×2 blocks: the box halving averages identical values (exact), the
    shorter side is then 64 already, and the centre crop keeps columns 16..79 of the 96."""
    blocks = random_pixels((64, 96, 3), 7)
    save(blocks.repeat(2, axis=0).repeat(2, axis=1), tmp_path / "wide.png")  # (128, 192, 3)
    ds = load_dataset("folder", str(tmp_path), image_size=64, channels=3)
    x, _ = ds[0]
    assert x.shape == (3, 64, 64) and ds.info.image_shape == (3, 64, 64)
    torch.testing.assert_close(x, as_unit(blocks[:, 16:80].transpose(2, 0, 1)), atol=0, rtol=0)


def test_channels_1_is_the_luma_and_a_grey_file_gives_three_equal_channels(tmp_path):
    rgb = random_pixels((64, 96, 3), 8)
    save(rgb, tmp_path / "colour" / "a.png")
    grey = random_pixels((16, 16), 9)
    save(grey, tmp_path / "grey" / "a.png")
    one = load_dataset("folder", str(tmp_path / "colour"), image_size=64, channels=1)
    x, _ = one[0]
    assert x.shape == (1, 64, 64)
    luma = rgb[:, 16:80].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    expected = torch.from_numpy(luma).float()[None] / 127.5 - 1.0
    torch.testing.assert_close(x, expected, atol=1.0 / 127.5 + 1e-6, rtol=0)  # PIL rounds to whole levels
    three = load_dataset("folder", str(tmp_path / "grey"), image_size=16, channels=3)
    x3, _ = three[0]
    assert x3.shape == (3, 16, 16)
    for c in range(3):
        torch.testing.assert_close(x3[c], as_unit(grey), atol=0, rtol=0)


def test_training_options_default_to_the_preset_and_apply_to_folders_only(tmp_path):
    save(random_pixels((40, 40, 3), 1), tmp_path / "a.png")
    ds = load_training_dataset(TrainConfig(dataset="folder", data_dir=str(tmp_path), preset="64"))
    assert ds.info.image_shape == (3, 64, 64)
    ds = load_training_dataset(TrainConfig(dataset="folder", data_dir=str(tmp_path), preset="tiny"))
    assert ds.info.image_shape == (1, 28, 28)
    ds = load_training_dataset(TrainConfig(dataset="folder", data_dir=str(tmp_path), preset="tiny", image_size=16,
                                           channels=3))
    assert ds.info.image_shape == (3, 16, 16)
    with pytest.raises(DataError, match="--image-size and --channels apply to --dataset folder"):
        load_training_dataset(TrainConfig(dataset="mnist", data_dir=str(tmp_path), image_size=32, channels=1))


def test_a_class_sorted_folder_keeps_every_image_for_training(tmp_path):
    """The evaluator's held-out split takes the last images in file order: for a folder sorted by class
    that would be a whole class, so folders are never split."""
    for k in range(2):
        for i in range(3):
            save(np.full((8, 8, 3), k, dtype=np.uint8), tmp_path / f"c{k}" / f"{i}.png")
    ds = load_dataset("folder", str(tmp_path), image_size=8)
    kept, excluded = without_judge_heldout(ds, heldout=2)
    assert kept is ds and excluded == 0


@pytest.mark.parametrize("layout, message", [
    ({}, "holds no images"),
    ({"a.png": "image", "cls/b.png": "image"}, "holds both files"),
    ({"cls/.hidden.png": "image"}, "class folder .*cls holds no images"),
])
def test_bad_layouts_are_one_line(tmp_path, layout, message):
    for name, _ in layout.items():
        save(random_pixels((8, 8, 3), 0), tmp_path / name)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("folder", str(tmp_path), image_size=8)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# In memory or through a DataLoader

def folder_of_random_images(root, count: int, size: int = 8, classes: int = 2):
    for i in range(count):
        save(random_pixels((size, size, 3), 100 + i), root / f"class{i % classes}" / f"{i:03d}.png")
    return root


def test_a_folder_too_large_for_memory_serves_the_same_pixels_from_files(tmp_path, monkeypatch):
    folder = folder_of_random_images(tmp_path / "data", 6)
    in_memory = load_dataset("folder", str(folder), image_size=8)
    monkeypatch.setattr(data_module, "IN_MEMORY_MAX_BYTES", 0)
    from_files = load_dataset("folder", str(folder), image_size=8)
    assert type(in_memory) is TensorImageDataset and type(from_files) is FolderImages
    assert from_files.info == in_memory.info
    for i in range(len(in_memory)):
        (a, ya), (b, yb) = in_memory[i], from_files[i]
        assert ya == yb
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_file_truncated_past_its_header_is_one_line_from_a_loader_worker(tmp_path, monkeypatch):
    """A JPEG cut in its scan data passes the header check and fails only when decoded, in a worker."""
    folder = folder_of_random_images(tmp_path / "data", 8, size=32, classes=1)
    buffer = io.BytesIO()
    Image.fromarray(random_pixels((32, 32, 3), 3)).save(buffer, format="JPEG")
    broken = folder / "class0" / "zz_cut.jpg"
    broken.write_bytes(buffer.getvalue()[:-50])  # the end of the scan data and the end-of-image marker
    monkeypatch.setattr(data_module, "IN_MEMORY_MAX_BYTES", 0)
    ds = load_dataset("folder", str(folder), image_size=32)  # the header check passes
    batches = Batches(ds, batch_size=9, world_size=1, rank=0, seed=0, device=CPU, num_workers=1)
    with pytest.raises(DataError) as info:
        list(batches.epoch(0, 0))
    assert re.fullmatch(re.escape(f"{broken} is not a readable image (image file is truncated") + r" \(\d+ bytes not "
                        r"processed\)\)", str(info.value)), str(info.value)


# --------------------------------------------------------------------------------------------------
# Random flips

def expected_flips(seed: int, epoch: int, total: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    u = torch.rand(total, generator=torch.Generator().manual_seed(seed + FLIP_SEED_OFFSET + epoch))
    return u[rank::world] < 0.5


def random_image_dataset(n: int) -> TensorImageDataset:
    pixels = torch.from_numpy(random_pixels((n, 3, 6, 6), 11))
    info = data_module.DatasetInfo("folder", "train", 0, (3, 6, 6), "generated")
    return TensorImageDataset(pixels, torch.zeros(n, dtype=torch.long), info)


@pytest.mark.parametrize("serve", ["in memory", "item by item"])
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_random_flip_mirrors_exactly_the_images_its_stream_draws(serve, rank, world):
    data = random_image_dataset(200)
    dataset = data if serve == "in memory" else ItemsOnly(data)
    plain = Batches(dataset, 8, world, rank, seed=5, device=CPU)
    flipped = Batches(dataset, 8, world, rank, seed=5, device=CPU, random_flip=True)
    assert flipped.on_device == (serve == "in memory")
    total = plain.sampler.total_size
    seen = []
    for epoch in (0, 1):
        mask = expected_flips(5, epoch, total, rank, world)
        torch.testing.assert_close(flipped.flip_mask(epoch), mask, atol=0, rtol=0)
        start = 3 if epoch == 1 else 0  # a resumed epoch flips the images an uninterrupted one does
        pairs = zip(plain.epoch(epoch, start), flipped.epoch(epoch, start))
        for b, ((x, y), (xf, yf)) in enumerate(pairs, start=start):
            m = mask[b * 8:(b + 1) * 8]
            assert torch.equal(y, yf)
            assert torch.equal(xf[m], x[m].flip(-1)) and torch.equal(xf[~m], x[~m])
            seen.append(m)
    share = torch.cat(seen).float().mean().item()
    assert 0.38 < share < 0.62, share  # about half (n ≈ 190: the standard deviation of the share is 0.036)
    assert not torch.equal(expected_flips(5, 0, total), expected_flips(5, 1, total))  # a fresh draw per epoch


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_random_flip_makes_no_host_sync(device):
    batches = Batches(random_image_dataset(64), 8, 1, 0, seed=0, device=torch.device(device), random_flip=True)
    with HostSyncCounter() as counter:
        count = sum(1 for _ in batches.epoch(0, 0))
    assert count == 8 and counter.seen == []
    generator = torch.Generator(device).manual_seed(FLIP_SEED_OFFSET)  # seed 0, epoch 0, on the device
    expected = torch.rand(64, device=device, generator=generator) < 0.5
    assert torch.equal(batches.flip_mask(0), expected)


def flip_cfg(tmp_path, **overrides) -> TrainConfig:
    base = dict(preset="tiny", timesteps=50, batch_size=8, heldout_size=16, max_steps=14, log_every=1,
                eval_every=10_000, sample_every=10_000, ckpt_every=10_000, sample_steps=2, lr=1e-3,
                warmup_steps=2, device="cpu", precision="fp32", judge_heldout=0, random_flip=True,
                out=str(tmp_path / "runs"))
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("serve", ["in memory", "item by item"])
def test_random_flip_resumes_exactly(tmp_path, serve):
    """96 images − 16 held out = 10 batches per epoch: a run stopped at step 6 and resumed to step 14 (into
    the second epoch) repeats the uninterrupted run's losses and ends with its weights."""
    data = edge_bar_dataset(96)  # left and right bars: a flip changes the image
    dataset = data if serve == "in memory" else ItemsOnly(data)
    full = train(flip_cfg(tmp_path / "full"), dataset)
    unflipped = train(flip_cfg(tmp_path / "plain", random_flip=False), dataset)
    first = train(flip_cfg(tmp_path / "cut", max_steps=6), dataset)
    assert load_checkpoint(first.run_dir / LAST_NAME)["progress"]["step"] == 6
    resumed = train(flip_cfg(tmp_path / "cut", resume=str(first.run_dir)), dataset,
                    given={"max_steps", "resume", "device"})
    rows = {name: {int(r["step"]): r for r in read_log(run.run_dir / "log.csv")}
            for name, run in (("full", full), ("plain", unflipped), ("resumed", resumed))}
    assert sorted(rows["resumed"]) == list(range(1, 15))
    for step in range(7, 15):
        for column in ("loss", "lr", "grad_norm", "skipped"):
            assert rows["resumed"][step][column] == rows["full"][step][column], (step, column)
    assert any(rows["plain"][s]["loss"] != rows["full"][s]["loss"] for s in range(1, 15))  # the flips did act
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------------
# Through stage3_train/train.py

BASE_ARGS = ["--dataset", "folder", "--preset", "tiny", "--image-size", "16", "--timesteps", "100",
             "--batch-size", "4", "--heldout-size", "4", "--sample-steps", "2", "--device", "cpu"]


@pytest.mark.parametrize("name, content", [
    ("broken.png", "truncated png"),
    ("notes.txt", b"these are notes, not pixels\n"),
    ("fake.jpg", b"not a jpeg either"),
])
def test_a_damaged_or_non_image_file_is_one_line_naming_it(tmp_path, name, content):
    folder = folder_of_random_images(tmp_path / "data", 12, size=16)
    if content == "truncated png":
        whole = png_bytes(random_pixels((16, 16, 3), 4))
        content = whole[: len(whole) // 2]
    (folder / "class1" / name).write_bytes(content)
    res = run_train([*BASE_ARGS, "--data-dir", str(folder), "--out", str(tmp_path / "runs"), "--max-steps", "1"],
                    cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and str(folder / "class1" / name) in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_class_conditional_training_on_a_flat_folder_says_use_no_class_cond(tmp_path):
    for i in range(12):
        save(random_pixels((16, 16, 3), i), tmp_path / "flat" / f"{i}.png")
    res = run_train([*BASE_ARGS, "--data-dir", str(tmp_path / "flat"), "--out", str(tmp_path / "runs"),
                     "--max-steps", "1"], cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--no-class-cond" in res.stderr


def test_end_to_end_on_a_generated_folder(tmp_path):
    """Class sub-folders of RGB images at 24×20, trained at 16×16 in 3 channels with flips."""
    for i in range(12):
        save(random_pixels((20, 24, 3), i), tmp_path / "data" / ("cats", "dogs")[i % 2] / f"{i}.png")
    res = run_train([*BASE_ARGS, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
                     "--max-steps", "2", "--channels", "3", "--random-flip", "--log-every", "1"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = next((tmp_path / "runs").iterdir())
    assert [int(r["step"]) for r in read_log(run / "log.csv")] == [1, 2]
    ckpt = load_checkpoint(run / LAST_NAME)
    assert ckpt["meta"]["image_shape"] == [3, 16, 16] and ckpt["meta"]["num_classes"] == 2
    record = json.loads((run / "options.json").read_text())
    options = record["options"]
    assert options["random_flip"] is True and options["image_size"] == 16
    assert record["dataset"]["class_names"] == ["cats", "dogs"] and options["data_on_device"] is True
