"""The evaluator on generated data with known answers: bar patterns whose class a classifier can read."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from shared.errors import UserError
from shared.evaluation.judge import (SmallCNN, accuracy, balanced_labels, format_table, frechet_distance, load_classifier,
                               parse_runs, per_class_accuracy, prepare_judge, save_classifier, split_real,
                               summarise_run, train_classifier)
from shared.diffusion.samplers import sample
from tests.tiny_trained import NUM_CLASSES, bar_patterns, one_thread, trained_tiny_model, write_bar_idx  # noqa: F401


@pytest.fixture(scope="module")
def bars():
    images, labels = bar_patterns(400, seed=11)
    return split_real(images, labels, heldout=100)


@pytest.fixture(scope="module")
def classifier(bars):
    (train_x, train_y), _ = bars
    return train_classifier(train_x, train_y, NUM_CLASSES, epochs=3, batch_size=64, shift_pixels=0,
                            progress=False)


def test_classifier_reads_the_bars(classifier, bars):
    _, (held_x, held_y) = bars
    assert accuracy(classifier, held_x, held_y) >= 0.98


def test_per_class_accuracy_known_answers(classifier, bars):
    _, (held_x, held_y) = bars
    right = per_class_accuracy(classifier, held_x, held_y, NUM_CLASSES)
    assert set(right) == set(range(NUM_CLASSES)) and min(right.values()) >= 0.85
    wrong = per_class_accuracy(classifier, held_x, (held_y + 1) % NUM_CLASSES, NUM_CLASSES)
    assert max(wrong.values()) <= 0.1
    # only the classes asked for appear
    assert set(per_class_accuracy(classifier, held_x[:3], held_y[:3], NUM_CLASSES)) == set(held_y[:3].tolist())


class FlattenFeatures(torch.nn.Module):
    """Identity features of 1 x 2 x 2 images (4-d), so the FD has a closed form to compare with."""

    num_features = 4

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1).float()


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. 2017, Eq. 6, with scipy's matrix square root in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 1, 2, 2, generator=gen)
    b = 0.5 * torch.randn(300, 1, 2, 2, generator=gen) + torch.tensor([1.0, 0.0, -0.5, 0.2]).view(1, 1, 2, 2)
    got = frechet_distance(FlattenFeatures(), a, b)
    assert got == pytest.approx(_reference_fd(a.flatten(1).double().numpy(), b.flatten(1).double().numpy()), rel=1e-3)
    assert abs(frechet_distance(FlattenFeatures(), a, a)) < 1e-3
    with pytest.raises(UserError, match=">= 2 images"):
        frechet_distance(FlattenFeatures(), a, b[:1])


def test_classifier_file_round_trip_and_bad_files(classifier, bars, tmp_path):
    _, (held_x, _) = bars
    path = save_classifier(classifier, tmp_path / "clf.pt", {"dataset": "bars"})
    loaded, meta = load_classifier(path)
    assert meta == {"dataset": "bars"}
    torch.testing.assert_close(loaded(held_x[:5]), classifier(held_x[:5]))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_classifier(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a classifier"):
        load_classifier(tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_classifier(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="expected images of shape"):
        per_class_accuracy(SmallCNN(1, 28), held_x, torch.zeros(held_x.shape[0], dtype=torch.long), 10)


def test_parse_runs_and_balanced_labels():
    assert parse_runs("ddpm:1000,ddim:50", "ddim", None) == [("ddpm", 1000), ("ddim", 50)]
    assert parse_runs(None, "dpmpp", 20) == [("dpmpp", 20)]
    assert parse_runs("ddpm", "ddim", None) == [("ddpm", None)]
    with pytest.raises(UserError, match="ddim:50"):
        parse_runs("ddim:fifty", "ddim", None)
    assert balanced_labels(3, 2).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(UserError, match="--heldout"):
        split_real(torch.zeros(5, 1, 4, 4), torch.zeros(5), 5)


def test_evaluator_end_to_end_on_the_trained_tiny_model(tmp_path):
    """prepare_judge (IDX files → classifier trained and saved) and a report on DDPM samples of the tiny
    model: every field present, in range, and the table prints."""
    images, labels = bar_patterns(700, seed=21)
    data_dir = write_bar_idx(tmp_path / "bars", images, labels)
    judge = prepare_judge("mnist", str(data_dir), str(tmp_path / "clf.pt"), 60, (1, 16, 16), NUM_CLASSES,
                          torch.device("cpu"), epochs=5, shift_pixels=0, progress=False)
    assert judge.accuracy >= 0.95 and (tmp_path / "clf.pt").exists()
    model, schedule = trained_tiny_model()
    asked = balanced_labels(NUM_CLASSES, 2)
    samples = sample(model, schedule, range(asked.numel()), labels=asked, sampler="ddim", num_steps=10,
                     clip_x0=True, progress=False)
    floor = judge.floor(asked.numel())
    run = summarise_run("ddim-10", judge.classifier, judge.feature, samples, asked, judge.heldout_images, floor,
                        {"sampler": "ddim", "steps": 10, "guidance_scale": 1.0, "seeds": list(range(20))})
    assert set(run["per_class_accuracy"]) == {str(k) for k in range(NUM_CLASSES)}
    assert all(0.0 <= v <= 1.0 for v in run["per_class_accuracy"].values())
    assert np.isfinite(run["frechet_distance"]) and run["real_floor"] >= 0 and run["num_samples"] == 20
    report = {"classifier_accuracy": judge.accuracy, "heldout_images": 60, "runs": [run]}
    table = format_table(report)
    assert "ddim-10" in table and "floor" in table
    # the reloaded classifier gives the same judge
    again = prepare_judge("mnist", str(data_dir), str(tmp_path / "clf.pt"), 60, (1, 16, 16), NUM_CLASSES,
                          torch.device("cpu"), progress=False)
    assert again.source.endswith("(loaded)") and again.accuracy == judge.accuracy
    with pytest.raises(UserError, match="the model makes"):
        prepare_judge("mnist", str(data_dir), None, 60, (1, 28, 28), NUM_CLASSES, torch.device("cpu"), progress=False)


def test_unconditional_runs_have_no_per_class_rows(classifier, bars):
    (train_x, _), (held_x, _) = bars
    run = summarise_run("ddim-5", classifier, FlattenFeatures(), held_x[:, :, :2, :2], None, held_x[:, :, :2, :2],
                        0.0, {"guidance_scale": None})
    assert run["per_class_accuracy"] == {} and run["mean_class_accuracy"] is None
    assert abs(run["frechet_distance"]) < 1e-3
    table = format_table({"classifier_accuracy": 1.0, "heldout_images": 100, "runs": [run]})
    assert "ddim-5" in table.splitlines()[-1]


def test_inception_fid_offline_is_a_clear_message(monkeypatch):
    import torchvision.models

    from shared.evaluation.judge import load_inception

    def offline(*args, **kwargs):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models, "inception_v3", offline)
    with pytest.raises(UserError, match="Inception FID unavailable: torchvision's Inception-v3 weights could not"):
        load_inception()
