"""Checkpoint files: atomic writes, round trips, and a clear UserError for every bad file."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from shared.records.checkpoint import (EMA_NAME, LAST_NAME, TRAIN_FORMAT, atomic_save, check_same_model, ema_file,
                               load_checkpoint, load_for_sampling)
from shared.errors import UserError
from shared.diffusion.schedule import NoiseSchedule
from shared.training.config import TrainConfig
from shared.training.loop import train
from shared.model.unet import UNet
from tests.stage3_helpers import edge_bar_dataset, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 6-step class-conditional tiny run on generated 8×8 data: its directory and result."""
    out = tmp_path_factory.mktemp("ckpt_runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = TrainConfig(preset="tiny", timesteps=50, batch_size=8, heldout_size=8, max_steps=6, eval_every=3,
                      ckpt_every=3, sample_steps=2, class_cond=True, device="cpu", out=str(out))
    result = train(cfg, edge_bar_dataset(64))
    torch.set_num_threads(before)
    return result


def _ema_record(model, schedule, **meta):
    return ema_file(model.config, model.state_dict(), schedule.to_dict(),
                    {"dataset": "mnist", "preset": "tiny", "num_classes": model.num_classes,
                     "image_shape": [1, 8, 8], **meta})


def test_atomic_save_round_trip_leaves_no_temporary(tmp_path):
    obj = {"format": TRAIN_FORMAT, "w": torch.arange(5.0), "nested": {"a": [1, 2.5, None, "x"]},
           "model_config": {}, "schedule": {}, "meta": {}}
    path = atomic_save(obj, tmp_path / "x.pt")
    back = load_checkpoint(path)
    assert torch.equal(back["w"], obj["w"]) and back["nested"] == obj["nested"]
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"format": TRAIN_FORMAT, "v": 1, "model_config": {}, "schedule": {}, "meta": {}}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"unpicklable": lambda: 0}, path)  # torch.save fails half-way through
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_load_for_sampling_from_run_dir_and_files(trained_run):
    run = trained_run.run_dir
    model, schedule, meta = load_for_sampling(run, "cpu")  # the directory → its ema.pt
    assert meta["checkpoint"].endswith(EMA_NAME)
    assert (meta["dataset"], meta["num_classes"], meta["image_shape"]) == ("mnist", 4, [1, 8, 8])
    assert meta["schedule"] == {"kind": "linear", "num_timesteps": 50} and "options" in meta
    assert isinstance(schedule, NoiseSchedule) and schedule.num_timesteps == 50
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for k, v in trained_run.ema.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ema_from_last, _, _ = load_for_sampling(run / LAST_NAME, "cpu", which="ema")
    raw, _, _ = load_for_sampling(run / LAST_NAME, "cpu", which="model")
    for k, v in trained_run.model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v.cpu()), k
        assert torch.equal(ema_from_last.state_dict()[k], model.state_dict()[k]), k
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), torch.tensor([0, 4])
    torch.testing.assert_close(model(x, t, y), trained_run.ema(x, t, y))
    with pytest.raises(UserError, match="holds only EMA weights"):
        load_for_sampling(run / EMA_NAME, "cpu", which="model")


def test_training_checkpoint_holds_everything_for_resume(trained_run):
    ckpt = load_checkpoint(trained_run.run_dir / LAST_NAME)
    for key in ("model", "ema", "optimizer", "lr_scheduler", "scaler", "progress", "rng", "options"):
        assert key in ckpt, key
    assert ckpt["progress"]["step"] == 6 and ckpt["progress"]["batch_in_epoch"] == 6 % (56 // 8)
    rng = ckpt["rng"][0]
    for key in ("torch_cpu", "torch_cuda", "numpy", "python", "train_noise", "loader"):
        assert key in rng, key
    assert ckpt["ema"]["n_averaged"].item() == 6


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_or_truncated_file_is_a_user_error(trained_run, tmp_path, damage):
    good = (trained_run.run_dir / LAST_NAME).read_bytes()
    data = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": os.urandom(2048)}[damage]
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    with pytest.raises(UserError, match="empty|corrupt"):
        load_for_sampling(path, "cpu")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": TRAIN_FORMAT, "payload": _RunsCode()}, path)
    with pytest.raises(UserError, match="would run code"):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a ddpm-from-scratch checkpoint"):
        load_for_sampling(tmp_path / "other.pt", "cpu")
    with open(tmp_path / "list.pt", "wb") as f:
        pickle.dump([1, 2], f, protocol=2)
    with pytest.raises(UserError):
        load_for_sampling(tmp_path / "list.pt", "cpu")
    with pytest.raises(UserError, match="does not exist"):
        load_for_sampling(tmp_path / "missing.pt", "cpu")
    with pytest.raises(UserError, match="no checkpoint in directory"):
        load_for_sampling(tmp_path, "cpu")


def test_other_architecture_is_named(tmp_path):
    schedule = NoiseSchedule("linear", 50)
    small = UNet.from_preset("tiny", image_size=8)
    record = _ema_record(small, schedule)
    record["model_config"] = {**record["model_config"], "base_channels": 32}  # weights of 16, config says 32
    atomic_save(record, tmp_path / EMA_NAME)
    with pytest.raises(UserError, match="does not fit this architecture .*shape"):
        load_for_sampling(tmp_path, "cpu")
    record["model_config"] = {**record["model_config"], "transformer_layers": 12}  # not a UNet argument
    atomic_save(record, tmp_path / EMA_NAME)
    with pytest.raises(UserError, match="model config this code cannot build"):
        load_for_sampling(tmp_path, "cpu")

    ckpt = {"model_config": small.config, "meta": {"preset": "tiny"}}
    with pytest.raises(UserError, match="preset 'tiny', but this run uses preset 'mnist'"):
        check_same_model(ckpt, small.config, "mnist", "ck.pt")
    wider = UNet.from_preset("tiny", image_size=8, base_channels=32).config
    with pytest.raises(UserError, match="base_channels: checkpoint 16 vs this run 32"):
        check_same_model(ckpt, wider, "tiny", "ck.pt")


def test_a_config_written_before_a_field_existed_is_that_fields_default(tmp_path):
    """A stored config without conv_resample is read at the field's default: a network with the convs."""
    schedule = NoiseSchedule("linear", 50)
    model = UNet.from_preset("tiny", image_size=8)
    record = _ema_record(model, schedule)
    record["model_config"] = {k: v for k, v in record["model_config"].items() if k != "conv_resample"}
    atomic_save(record, tmp_path / EMA_NAME)
    loaded, _, _ = load_for_sampling(tmp_path, "cpu")
    assert loaded.config == model.config
    old = {"model_config": record["model_config"], "meta": {"preset": "tiny"}}
    check_same_model(old, model.config, "tiny", "ck.pt")  # the same network: no error
    without = UNet.from_preset("tiny", image_size=8, conv_resample=False).config
    with pytest.raises(UserError, match="conv_resample: checkpoint True vs this run False"):
        check_same_model(old, without, "tiny", "ck.pt")
