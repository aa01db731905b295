"""scripts/quality_curve.py: steps read from the snapshots, minutes from the step at a given speed,
accuracies and FD/floor from evaluate.py's results.json."""
import json
from pathlib import Path

import pytest

from shared.diffusion.schedule import NoiseSchedule
from shared.errors import UserError
from shared.model.unet import UNet
from shared.records.checkpoint import atomic_save, ema_file
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script(ROOT / "scripts" / "quality_curve.py")


def _evaluation(folder: Path, checkpoint: Path, runs: list[tuple[float, float, float, float]]) -> Path:
    """An evaluate.py-style results.json: one run per (w, accuracy, FD, floor)."""
    folder.mkdir(parents=True)
    report = {"checkpoint": str(checkpoint), "runs": [
        {"guidance_scale": w, "mean_class_accuracy": acc, "frechet_distance": fd, "real_floor": floor,
         "num_samples": 300} for w, acc, fd, floor in runs]}
    (folder / "results.json").write_text(json.dumps(report))
    return folder


def test_table_and_figure_from_two_snapshots(tmp_path, capsys):
    model = UNet.from_preset("tiny", in_channels=1, image_size=8, num_classes=0)
    evals = []
    for step, acc in ((20, 0.5), (40, 0.9)):
        ckpt = atomic_save(ema_file(model.config, model.state_dict(), NoiseSchedule().to_dict(), {"step": step}),
                           tmp_path / f"ema-{step:07d}.pt")
        evals.append(_evaluation(tmp_path / f"eval{step}", ckpt, [(1.0, acc, 40.0, 10.0), (3.0, acc + 0.05, 30.0, 10.0)]))
    out = tmp_path / "curve.png"
    # 20 steps of 128 images at 64 images/s: 40 s = 0.7 min; 40 steps: 1.3 min
    _script().main(["--images-per-s", "64", "--evals", *map(str, evals), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    # training seconds: 20 at step 20, 60 at step 40; scaled so that step 40 is 2 minutes
    assert lines[1].split()[:3] == ["20", "0.7", "300"] and lines[2].split()[:3] == ["40", "1.3", "300"]
    assert lines[2].split()[3:] == ["90.0%", "95.0%", "4.00", "3.00"]
    assert out.stat().st_size > 0


def test_a_folder_without_results_is_refused(tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(UserError, match="holds no results.json"):
        _script().main(["--images-per-s", "100", "--evals", str(tmp_path / "eval"), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
