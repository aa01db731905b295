"""The FID (Inception): torchmetrics' default extractor read from a weights file, never downloaded.

The real weights cannot be fetched here, so a file of the same architecture is made from the extractor
itself with random weights (He-initialised convolutions, so the 2048 features neither vanish nor blow up
through the 94 layers). It checks the loading, the features against torch-fidelity's own forward, the FID
against a float64 numpy computation, and the one line when no weights are found.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import UserError
from shared.evaluation.frechet import (INCEPTION_FEATURES, InceptionLogits, InceptionPool, fid_inception_cache,
                                       fid_inception_url, frechet_distance, load_fid_inception,
                                       resolve_fid_inception_weights)
from shared.records.images import to_uint8

fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3", reason="torch-fidelity is a test dependency")

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = ROOT / "stage5_guidance" / "evaluate.py"
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def _random_extractor(features: list[str]):
    """torch-fidelity's FeatureExtractorInceptionV3 with random weights: its constructor would download
    and load the real ones, so both steps are skipped while it is built."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        return fe.FeatureExtractorInceptionV3("inception-v3-compat", features)


def save_random_fid_weights(path: Path, seed: int = 0) -> Path:
    """A weights file with the FID Inception architecture and random weights, as the loader reads it."""
    torch.manual_seed(seed)
    net = _random_extractor(["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)  # what torch-fidelity's loader reads: a plain state dict
    return path


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return save_random_fid_weights(tmp_path_factory.mktemp("fid") / "random-inception.pth")


@pytest.fixture(scope="module")
def net(weights_file):
    return load_fid_inception(str(weights_file))


@pytest.fixture(scope="module")
def image_sets():
    """Two sets [N x 3 x 32 x 32] in [−1, 1] with different statistics (the second brighter)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 32, 32, generator=gen) * 2 - 1
    y = (torch.rand(10, 3, 32, 32, generator=gen) * 1.2 - 0.2).clamp(-1, 1)
    return x, y


def _frechet_float64(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. 2017, Eq. 6 in float64, with Tr((Σ_a Σ_b)^½) = Σ √eig(Σ_a^½ Σ_b Σ_a^½) (symmetric, so
    numpy's eigh is exact to rounding even for the rank-deficient covariances of a few images)."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def test_the_file_loads_and_gives_torch_fidelity_features(net, weights_file, image_sets):
    x, _ = image_sets
    pool, logits = InceptionPool(net), InceptionLogits(net)
    features, probs_logits = pool(x[:4]), logits(x[:4])
    assert features.shape == (4, INCEPTION_FEATURES) and features.dtype == torch.float32
    assert probs_logits.shape == (4, 1008)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    # independent reference: torch-fidelity's own extractor (its TensorFlow-1 resize) on the same uint8 images
    reference = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights_file))
    ref_features, ref_logits = reference(to_uint8(x[:4]))
    torch.testing.assert_close(features, ref_features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert features.std(0).mean() > 1e-3  # the random weights give features that tell images apart


def test_fid_of_a_set_with_itself_is_zero_and_matches_float64_numpy(net, image_sets):
    x, y = image_sets
    pool = InceptionPool(net)
    fx, fy = pool(x).double().numpy(), pool(y).double().numpy()
    expected = _frechet_float64(fx, fy)
    assert expected > 1.0  # a real gap between the two sets, so the comparison below means something
    assert frechet_distance(pool, x, y) == pytest.approx(expected, rel=1e-5)
    assert abs(frechet_distance(pool, x, x)) < 1e-5 * expected


def test_gray_images_are_repeated_over_three_channels(net, image_sets):
    x, _ = image_sets
    gray = x[:2, :1]
    pool = InceptionPool(net)
    torch.testing.assert_close(pool(gray), pool(gray.expand(-1, 3, -1, -1)))
    with pytest.raises(UserError, match=re.escape("N x 1|3 x H x W")):
        pool(x[:2, :2])


def test_weights_come_from_the_flag_or_torch_hubs_cache(weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = fid_inception_cache()
    assert cached == tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_NAME
    assert fid_inception_url().endswith("/" + WEIGHTS_NAME)
    with pytest.raises(UserError) as err:
        resolve_fid_inception_weights(None)
    line = str(err.value)
    assert "\n" not in line and str(cached) in line and fid_inception_url() in line and "--inception-weights" in line
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights_file)
    assert resolve_fid_inception_weights(None) == cached
    assert resolve_fid_inception_weights(str(weights_file)) == weights_file
    with pytest.raises(UserError, match="no such file"):
        resolve_fid_inception_weights(str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="is a directory"):
        resolve_fid_inception_weights(str(tmp_path))


def test_a_file_with_other_contents_is_one_line(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(UserError, match="not a PyTorch weights file"):
        load_fid_inception(str(text))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(UserError, match="not the FID Inception weights") as err:
        load_fid_inception(str(other))
    assert "\n" not in str(err.value)


def test_evaluate_without_the_weights_is_one_line_before_any_work(tmp_path):
    """CIFAR-10 needs the weights: with neither --inception-weights nor the cache, evaluate.py stops
    before it loads the model or trains a classifier."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, str(EVALUATE), "--checkpoint", str(tmp_path / "run"), "--dataset", "cifar10",
            "--data-dir", str(tmp_path / "data"), "--classifier", str(tmp_path / "clf.pt"),
            "--out", str(tmp_path / "out"), "--no-progress"]
    for extra, needle in (([], str(tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_NAME)),
                          (["--inception-weights", str(tmp_path / "absent.pth")], "no such file")):
        result = subprocess.run(base + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "clf.pt").exists()
