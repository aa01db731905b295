"""evaluate.py's bad inputs and failures: one line on stderr, exit 2, no output folder, and a classifier
trained in a failed run is kept."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from shared import flags
from tests.scripts import load_script
from tests.tiny_trained import bar_patterns, one_thread, save_tiny_checkpoint, write_bar_idx  # noqa: F401

EVALUATE = Path(__file__).resolve().parents[1] / "stage5_guidance" / "evaluate.py"


@pytest.fixture(scope="module")
def evaluate():
    return load_script(EVALUATE)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    images, labels = bar_patterns(300, seed=41)
    return save_tiny_checkpoint(root / "ckpt").parent, write_bar_idx(root / "bars", images, labels)


def _fails_in_one_line(evaluate, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        flags.run_main(evaluate.main, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("runs,needle", [("ddim:0", "steps must be >= 1"), ("ddim:5000", "exceed the model's T = 100"),
                                         ("plms:5", "unknown sampler 'plms'"), ("ddim:fifty", "look like ddim:50")])
def test_bad_runs_are_refused_before_any_output(evaluate, assets, tmp_path, capsys, runs, needle):
    ckpt, data = assets
    out = tmp_path / "out"
    line = _fails_in_one_line(evaluate, ["--checkpoint", str(ckpt), "--data-dir", str(data), "--runs", runs,
                                         "--classifier", str(tmp_path / "clf.pt"), "--out", str(out),
                                         "--no-progress"], capsys)
    assert needle in line
    assert not (tmp_path / "clf.pt").exists()  # refused before the classifier was trained
    assert not out.exists() or not any(out.iterdir())


def test_bad_classifier_paths_are_one_line(evaluate, assets, tmp_path, capsys):
    ckpt, data = assets
    (tmp_path / "a_file").write_text("x")
    base = ["--checkpoint", str(ckpt), "--data-dir", str(data), "--out", str(tmp_path / "out"), "--no-progress"]
    line = _fails_in_one_line(evaluate, base + ["--classifier", str(tmp_path / "a_file" / "clf.pt")], capsys)
    assert "is a file, not a directory" in line
    line = _fails_in_one_line(evaluate, base + ["--classifier", str(tmp_path)], capsys)
    assert "is a directory" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_full_disk_at_the_end_keeps_the_classifier_and_leaves_no_folder(evaluate, assets, tmp_path, capsys,
                                                                          monkeypatch):
    ckpt, data = assets
    out, clf = tmp_path / "out", tmp_path / "clf.pt"
    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "results.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    line = _fails_in_one_line(evaluate, ["--checkpoint", str(ckpt), "--data-dir", str(data), "--classifier", str(clf),
                                         "--classifier-epochs", "1", "--heldout", "50", "--per-class", "1",
                                         "--runs", "ddim:2", "--out", str(out), "--no-progress"], capsys)
    assert "No space left on device" in line and "nothing was kept there" in line
    assert clf.is_file()  # the classifier trained in this run survives the failure
    assert out.is_dir() and list(out.iterdir()) == []  # the numbered folder was removed again


def test_inception_weights_add_the_fid_inception_measures(evaluate, assets, tmp_path, capsys):
    """--inception-weights on data other than CIFAR-10 adds the FID (Inception) and its Inception Score,
    named apart from the classifier-feature FD in results.json (random weights of the right architecture)."""
    pytest.importorskip("torch_fidelity", reason="torch-fidelity is a test dependency")
    from tests.test_fid_extractor import save_random_fid_weights

    ckpt, data = assets
    weights = save_random_fid_weights(tmp_path / "inception.pth")
    report = evaluate.main(["--checkpoint", str(ckpt), "--data-dir", str(data), "--classifier", str(tmp_path / "clf.pt"),
                            "--classifier-epochs", "1", "--heldout", "20", "--per-class", "1", "--runs", "ddim:2",
                            "--inception-weights", str(weights), "--out", str(tmp_path / "out"), "--no-progress"])
    assert report["inception_weights"] == str(weights)
    assert report["measures"]["frechet_distance"].startswith("FD (classifier features)")
    assert report["measures"]["inception_fid"].startswith("FID (Inception)")
    run = report["runs"][0]
    assert run["inception_fid"] > 0 and run["inception_fid"] != run["frechet_distance"]
    assert 1.0 <= run["inception_is"] <= 1008 and 1.0 <= report["real_inception_is"] <= 1008
    assert "FID (Inception)" in capsys.readouterr().out
    (written,) = (tmp_path / "out").glob("*/results.json")
    assert json.loads(written.read_text()) == report
