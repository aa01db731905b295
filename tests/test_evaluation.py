"""The evaluator on generated data with known answers: bar patterns whose class a classifier can read."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from shared.errors import UserError
from shared.evaluation.classifier import (ClassifierRecipe, SmallCNN, accuracy, class_probabilities, load_classifier,
                                          per_class_accuracy, save_classifier, train_classifier)
from shared.evaluation.frechet import frechet_distance
from shared.evaluation.inception_score import inception_score, torchmetrics_inception_score
from shared.evaluation.judge import JudgeSource, prepare_judge, split_real
from shared.evaluation.report import balanced_labels, check_runs, format_table, parse_runs, summarise_run
from tests.tiny_trained import NUM_CLASSES, bar_patterns, one_thread, trained_tiny_model, write_bar_idx, draw  # noqa: F401


@pytest.fixture(scope="module")
def bars():
    images, labels = bar_patterns(400, seed=11)
    return split_real(images, labels, heldout=100)


@pytest.fixture(scope="module")
def classifier(bars):
    (train_x, train_y), _ = bars
    return train_classifier(train_x, train_y, NUM_CLASSES, ClassifierRecipe(epochs=3, batch_size=64, shift_pixels=0),
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
    with pytest.raises(UserError, match="is a directory"):
        load_classifier(tmp_path)
    with pytest.raises(UserError, match="is a file, not a directory"):
        save_classifier(classifier, tmp_path / "junk.pt" / "clf.pt", {})
    with pytest.raises(UserError, match="expected images of shape"):
        per_class_accuracy(SmallCNN(1, 28), held_x, torch.zeros(held_x.shape[0], dtype=torch.long), 10)


def test_parse_runs_and_balanced_labels():
    assert parse_runs("ddpm:1000,ddim:50", "ddim", None) == [("ddpm", 1000), ("ddim", 50)]
    assert parse_runs(None, "dpmpp", 20) == [("dpmpp", 20)]
    assert parse_runs("ddpm", "ddim", None) == [("ddpm", None)]
    with pytest.raises(UserError, match="ddim:50"):
        parse_runs("ddim:fifty", "ddim", None)
    assert balanced_labels(3, 2).tolist() == [0, 1, 2, 0, 1, 2]
    check_runs([("ddim", 50), ("ddpm", None)], ("ddpm", "ddim"), 100)
    for runs, needle in (([("euler", 5)], "unknown sampler"), ([("ddim", 0)], ">= 1"),
                         ([("ddim", 5000)], "exceed the model's T = 100")):
        with pytest.raises(UserError, match=needle):
            check_runs(runs, ("ddpm", "ddim"), 100)
    check_runs([("ddim", 5000)], ("ddim",))  # T unknown before the checkpoint loads: only the lower bound
    with pytest.raises(UserError, match="--heldout"):
        split_real(torch.zeros(5, 1, 4, 4), torch.zeros(5), 5)


def test_evaluator_end_to_end_on_the_trained_tiny_model(tmp_path):
    """prepare_judge (IDX files → classifier trained and saved) and a report on DDPM samples of the tiny
    model: every field present, in range, and the table prints."""
    images, labels = bar_patterns(700, seed=21)
    data_dir = write_bar_idx(tmp_path / "bars", images, labels)
    source = JudgeSource("mnist", str(data_dir), str(tmp_path / "clf.pt"), 60)
    judge = prepare_judge(source, (1, 16, 16), NUM_CLASSES, torch.device("cpu"),
                          ClassifierRecipe(epochs=5, shift_pixels=0), progress=False)
    assert judge.accuracy >= 0.95 and (tmp_path / "clf.pt").exists()
    model, schedule = trained_tiny_model()
    asked = balanced_labels(NUM_CLASSES, 2)
    samples = draw(model, schedule, range(asked.numel()), labels=asked, sampler="ddim", num_steps=10,
                     clip_x0=True, progress=False)
    reference = {"real_floor": judge.floor(asked.numel()), "real_inception_score": judge.real_inception_score(20)}
    run = summarise_run("ddim-10", judge.classifier, judge.feature, samples, asked, judge.heldout_images, reference,
                        {"sampler": "ddim", "steps": 10, "guidance_scale": 1.0, "seeds": list(range(20))})
    assert set(run["per_class_accuracy"]) == {str(k) for k in range(NUM_CLASSES)}
    assert all(0.0 <= v <= 1.0 for v in run["per_class_accuracy"].values())
    assert np.isfinite(run["frechet_distance"]) and run["real_floor"] >= 0 and run["num_samples"] == 20
    # the real reference: the IS of the very images the FD floor uses, inside (1, K]
    real = judge.real_images(20)
    assert real.shape == (20, 1, 16, 16)
    assert run["real_inception_score"] == inception_score(class_probabilities(judge.classifier, real))
    assert run["inception_score_bound"] == NUM_CLASSES and 1.0 < run["real_inception_score"] <= NUM_CLASSES
    assert 1.0 <= run["inception_score"] <= NUM_CLASSES
    report = {"classifier_accuracy": judge.accuracy, "heldout_images": 60, "runs": [run]}
    table = format_table(report)
    assert "ddim-10" in table and "floor" in table and f"IS≤{NUM_CLASSES}" in table and "real IS" in table
    # the reloaded classifier gives the same judge
    again = prepare_judge(source, (1, 16, 16), NUM_CLASSES, torch.device("cpu"), progress=False)
    assert again.source.endswith("(loaded)") and again.accuracy == judge.accuracy
    with pytest.raises(UserError, match="the model makes"):
        prepare_judge(JudgeSource("mnist", str(data_dir), None, 60), (1, 28, 28), NUM_CLASSES, torch.device("cpu"),
                      progress=False)


def test_unconditional_runs_have_no_per_class_rows(classifier, bars):
    from shared.evaluation.frechet import PenultimateFeatures

    _, (held_x, _) = bars
    run = summarise_run("ddim-5", classifier, PenultimateFeatures(classifier), held_x, None, held_x,
                        {"real_floor": 0.0, "real_inception_score": 9.9}, {"guidance_scale": None})
    assert run["per_class_accuracy"] == {} and run["mean_class_accuracy"] is None
    assert abs(run["frechet_distance"]) < 1e-2 and run["real_inception_score"] == 9.9
    table = format_table({"classifier_accuracy": 1.0, "heldout_images": 100, "runs": [run]})
    assert "ddim-5" in table.splitlines()[-1]


def test_save_classifier_on_a_full_disk_is_one_line(classifier, tmp_path, monkeypatch):
    import errno

    import shared.records.checkpoint as checkpoint

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(UserError, match="clf.pt.*No space left on device"):
        save_classifier(classifier, tmp_path / "clf.pt", {})
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


# --------------------------------------------------------------------------------------------------
# Inception Score: closed forms and a float64 hand computation


def test_inception_score_uniform_predictions_give_one():
    assert inception_score(torch.full((37, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_balanced_one_hot_gives_the_class_count():
    for k in (2, 10, 17):
        probs = torch.nn.functional.one_hot(torch.arange(k).repeat(3), k).float()
        assert inception_score(probs) == pytest.approx(float(k), rel=1e-12)
    # all images certain of the same class: p(y|x) = p(y), so IS = 1
    assert inception_score(torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 5).float()) == \
        pytest.approx(1.0, abs=1e-12)


def test_inception_score_random_case_matches_a_float64_hand_computation():
    gen = np.random.default_rng(3)
    logits = gen.normal(size=(50, 7)) * 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    marginal = probs.mean(0)
    kl = [sum(p[j] * (np.log(p[j]) - np.log(marginal[j])) for j in range(7)) for p in probs]
    expected = float(np.exp(np.mean(kl)))
    assert inception_score(torch.from_numpy(probs).float()) == pytest.approx(expected, rel=1e-5)
    assert inception_score(torch.from_numpy(probs)) == pytest.approx(expected, rel=1e-12)


def test_torchmetrics_inception_score_agrees_with_ours():
    """The CIFAR path (torchmetrics' InceptionScore with our logits module) and the classifier path
    compute the same quantity."""
    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 6)

        def forward(self, x):
            return self.proj(x.flatten(1).float())

    torch.manual_seed(0)
    net, images = Logits(), torch.rand(40, 1, 2, 2) * 2 - 1
    ours = inception_score(net(images).softmax(1).detach())
    assert torchmetrics_inception_score(net, images) == pytest.approx(ours, rel=1e-5)


def test_classifier_probabilities_rows_sum_to_one(classifier, bars):
    _, (held_x, held_y) = bars
    probs = class_probabilities(classifier, held_x)
    assert probs.shape == (held_x.shape[0], NUM_CLASSES)
    torch.testing.assert_close(probs.sum(1), torch.ones(held_x.shape[0]))
    assert (probs.argmax(1) == held_y).float().mean() >= 0.98
