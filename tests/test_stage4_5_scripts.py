"""Stage 4 and 5 scripts end to end on the tiny trained checkpoint and generated bar data.

In-process runs (main(argv)) cover the outputs; subprocess runs cover the one-line errors and exit
codes of bad input.
"""
from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.evaluation.classifier import ClassifierRecipe, save_classifier, train_classifier
from tests.scripts import load_script
from tests.tiny_trained import NUM_CLASSES, bar_patterns, one_thread, save_tiny_checkpoint, write_bar_idx  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SAMPLE, GUIDE, EVALUATE = (REPO / "stage4_sampling" / "sample.py", REPO / "stage5_guidance" / "guide.py",
                           REPO / "stage5_guidance" / "evaluate.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(checkpoint dir, IDX data dir, classifier file) in a module-wide temporary folder."""
    root = tmp_path_factory.mktemp("stage45")
    ckpt = save_tiny_checkpoint(root / "ckpt").parent
    images, labels = bar_patterns(400, seed=31)
    data = write_bar_idx(root / "bars", images, labels)
    clf = train_classifier(images[:-100], labels[:-100], NUM_CLASSES, ClassifierRecipe(epochs=4, batch_size=64,
                                                                                      shift_pixels=0), progress=False)
    clf_path = save_classifier(clf, root / "clf.pt", {"dataset": "bars"})
    return ckpt, data, clf_path


def _only_dir(parent: Path) -> Path:
    dirs = sorted(p for p in parent.iterdir() if p.is_dir())
    return dirs[-1]


def test_sample_py_trajectory_compare_and_quality(assets, tmp_path):
    ckpt, data, clf = assets
    sample = load_script(SAMPLE)
    results = sample.main(["--checkpoint", str(ckpt), "--n", "4", "--sampler", "dpmpp", "--steps", "5", "--clip-x0",
                           "--trajectory", "--compare-steps", "2,5", "--classifier", str(clf), "--data-dir", str(data),
                           "--heldout", "50", "--out", str(tmp_path), "--no-progress"])
    run = _only_dir(tmp_path)
    for name in ("samples.png", "trajectory.png", "trajectory.gif", "compare.png", "quality.png", "results.json",
                 "options.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [r["steps"] for r in saved["runs"]] == [5, 2, 5] and all(r["images_per_s"] > 0 for r in saved["runs"])
    assert all("frechet_distance" in r for r in saved["runs"][1:])
    _check_every_image(run, seeds=[0, 1, 2, 3], labels=[0, 1, 2, 3])
    # a second run gets a new directory; the first is left as it was
    before = sorted(p.name for p in run.iterdir())
    sample.main(["--checkpoint", str(ckpt), "--n", "2", "--sampler", "ddpm", "--out", str(tmp_path), "--no-progress"])
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2 and sorted(p.name for p in run.iterdir()) == before


def _check_every_image(run: Path, seeds: list[int], labels: list[int]) -> None:
    """images/NNNNNN.png and samples.npz hold every sample, the same pixels, with their labels and seeds."""
    import numpy as np
    from PIL import Image

    archive = np.load(run / "samples.npz")
    images = archive["images"]
    assert images.dtype == np.uint8 and images.shape[0] == len(seeds) and images.shape[-1] == 1
    assert archive["seeds"].tolist() == seeds and archive["labels"].tolist() == labels
    pngs = sorted((run / "images").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(len(seeds))]
    for png, image in zip(pngs, images):
        assert np.array_equal(np.asarray(Image.open(png)), image[..., 0])
    assert not any(p.name.startswith(".") for p in run.iterdir())  # no pending file left


def test_sample_py_streams_several_batches(assets, tmp_path):
    """--n 5 at --batch-size 2: three batches, every sample written once and in order; the trajectory
    is the first batch's chain only."""
    ckpt, _, _ = assets
    sample = load_script(SAMPLE)
    sample.main(["--checkpoint", str(ckpt), "--n", "5", "--batch-size", "2", "--sampler", "ddim", "--steps", "2",
                 "--seed", "40", "--trajectory", "--out", str(tmp_path), "--no-progress"])
    run = _only_dir(tmp_path)
    _check_every_image(run, seeds=[40, 41, 42, 43, 44], labels=[0, 1, 2, 3, 4])
    assert (run / "trajectory.png").is_file() and (run / "samples.png").is_file()


def test_guide_py_modes(assets, tmp_path, monkeypatch):
    ckpt, _, _ = assets
    guide = load_script(GUIDE)
    common = ["--checkpoint", str(ckpt), "--steps", "3", "--out", str(tmp_path), "--no-progress"]
    assert guide.main(common + ["--grid", "--n", "2"])[0]["images"] == 2 * NUM_CLASSES
    _check_every_image(_only_dir(tmp_path), seeds=[0, 1] * NUM_CLASSES,
                       labels=[k for k in range(NUM_CLASSES) for _ in range(2)])
    sweep = guide.main(common + ["--sweep", "0,1,4", "--n", "3"])
    assert [r["guidance_scale"] for r in sweep] == [0.0, 1.0, 4.0]
    assert guide.main(common + ["--prompt", " Seven ", "--n", "2"])[0]["picture"].startswith("class-7")
    answers = iter(["4", "nonsense", "grid"])

    def fake_input(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    interactive = guide.main(common + ["--interactive", "--n", "1"])
    assert [r["images"] for r in interactive] == [1, NUM_CLASSES]
    names = {p.name.split("-", 1)[1] for p in tmp_path.iterdir()}
    assert names == {"grid", "sweep", "class-7", "interactive"}
    assert (_only_dir(tmp_path) / "grid-001.png").is_file()


def test_evaluate_py_reports_table_and_json(assets, tmp_path, capsys):
    ckpt, data, clf = assets
    evaluate = load_script(EVALUATE)
    report = evaluate.main(["--checkpoint", str(ckpt), "--data-dir", str(data), "--classifier", str(clf),
                            "--heldout", "50", "--per-class", "2", "--runs", "ddpm,ddim:5", "--clip-x0",
                            "--guidance-scale", "2", "--seed", "7", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "classifier accuracy on real held-out data" in out and "ddpm-100" in out and "ddim-5" in out
    saved = json.loads((_only_dir(tmp_path) / "results.json").read_text())
    assert saved["classifier_accuracy"] == report["classifier_accuracy"] >= 0.9
    for run, (name, steps) in zip(saved["runs"], (("ddpm", 100), ("ddim", 5))):
        assert (run["sampler"], run["steps"], run["num_samples"], run["guidance_scale"]) == (name, steps, 20, 2.0)
        assert run["seeds"] == list(range(7, 27)) and run["real_floor"] >= 0


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


BAD_INPUT = [
    (SAMPLE, ["--checkpoint", "/nonexistent/run"], "does not exist"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--steps", "500"], "exceeds the model's T = 100"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--eta", "-1"], "--eta"),
    (GUIDE, ["--checkpoint", "{ckpt}", "--prompt", "eleven"], "accepted"),
    (GUIDE, ["--checkpoint", "{ckpt}", "--digit", "12"], "--digit must lie in [0, 9]"),
    (GUIDE, ["--checkpoint", "{ckpt}"], "one of the arguments"),
    (EVALUATE, ["--checkpoint", "{ckpt}", "--runs", "plms:5"], "unknown sampler 'plms'"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--eta", "inf"], "--eta"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--eta", "nan"], "--eta"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--label", "11"], "--label must lie in [0, 9]"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--seed", "99999999999999999999999"], "--seed"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--seed", str(2**63 - 2), "--n", "4"], "largest seed"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
    (SAMPLE, ["--checkpoint", "{ckpt}", "--compare-steps", "2", "--classifier", "{dir}"], "is a directory"),
    (GUIDE, ["--checkpoint", "{ckpt}", "--sweep", "1,2", "--sweep-label", "11"], "--sweep-label must lie in [0, 9]"),
    (GUIDE, ["--checkpoint", "{ckpt}", "--digit", "3", "--eta", "inf"], "--eta"),
    (GUIDE, ["--checkpoint", "{ckpt}", "--grid", "--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA"),
]


@pytest.mark.parametrize("script,args,needle", BAD_INPUT, ids=[f"{s.stem}-{n[:12]}" for s, _, n in BAD_INPUT])
def test_bad_input_is_one_error_line_and_exit_2(assets, tmp_path, capsys, script, args, needle):
    """In-process through shared.flags.run_main (what `python script.py` runs): exit 2, one line, no output."""
    from shared import flags

    ckpt, _, _ = assets
    module = load_script(script)
    argv = [a.replace("{ckpt}", str(ckpt)).replace("{dir}", str(tmp_path)) for a in args]
    argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        flags.run_main(module.main, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert needle in lines[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_input_as_a_real_process(assets, tmp_path):
    ckpt, _, _ = assets
    result = _run(GUIDE, "--checkpoint", str(ckpt), "--prompt", "eleven", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()][-1].startswith("error: cannot read 'eleven'")


def test_fused_kernels_flag(assets, tmp_path):
    """--fused-kernels switches on the Triton U-Net ops (CPU: TRITON_INTERPRET=1, set by conftest) and
    the fused sampling step; where they cannot load, the run stops with the clear error instead."""
    ckpt, _, _ = assets
    result = _run(SAMPLE, "--checkpoint", str(ckpt), "--n", "1", "--steps", "2", "--fused-kernels",
                  "--out", str(tmp_path), "--no-progress")
    import kernels

    try:
        for name in ("group_norm_film_silu", "attention", "ddim_step"):
            kernels.load(name)
    except kernels.FusedKernelsUnavailable as err:
        assert result.returncode == 2 and "unavailable" in result.stderr, result.stderr
        pytest.skip(f"fused kernels unavailable here; the clear error was checked: {err}")
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout


def _one_error_line(capsys, module, argv) -> str:
    """Runs module.main through flags.run_main; asserts exit 2 and one 'error:' line, returns it."""
    from shared import flags

    with pytest.raises(SystemExit) as exit_info:
        flags.run_main(module.main, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
    """The tiny checkpoint with one weight set to NaN: every sample it makes is NaN."""
    from shared.records.checkpoint import EMA_NAME, atomic_save, ema_file
    from tests.tiny_trained import trained_tiny_model

    model, schedule = trained_tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["out_conv.weight"][0, 0, 0, 0] = float("nan")
    folder = tmp_path_factory.mktemp("nan_ckpt")
    meta = {"dataset": "mnist", "num_classes": NUM_CLASSES, "image_shape": [1, model.image_size, model.image_size],
            "schedule": schedule.to_dict()}
    atomic_save(ema_file(model.config, state, schedule.to_dict(), meta), folder / EMA_NAME)
    return folder


@pytest.mark.parametrize("script,extra", [(SAMPLE, []), (GUIDE, ["--digit", "3"])])
def test_non_finite_samples_write_nothing(nan_checkpoint, tmp_path, capsys, script, extra):
    out = tmp_path / "out"
    line = _one_error_line(capsys, load_script(script), ["--checkpoint", str(nan_checkpoint), "--n", "2", "--steps", "3",
                                                   "--out", str(out), "--no-progress", *extra])
    assert "NaN" in line or "non-finite" in line, line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("script,extra,fits", [(SAMPLE, ["--trajectory"], 1), (GUIDE, ["--grid"], 0)])
def test_a_full_disk_leaves_no_output_folder(assets, tmp_path, capsys, monkeypatch, script, extra, fits):
    """ENOSPC while writing the PNGs (after `fits` pictures went through): one line, and the
    half-written run folder is removed."""
    import errno

    from PIL import Image

    ckpt, _, _ = assets
    written = []

    def full_disk(self, fp, *args, **kwargs):
        if len(written) >= fits:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(fp)
        return original(self, fp, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    line = _one_error_line(capsys, load_script(script), ["--checkpoint", str(ckpt), "--n", "2", "--steps", "2",
                                                   "--out", str(out), "--no-progress", *extra])
    assert "No space left on device" in line and len(written) == fits
    assert out.is_dir() and not any(out.iterdir())


def test_unavailable_fused_kernels_create_no_folder(assets, tmp_path, capsys, monkeypatch):
    import kernels

    def refuse(name):
        raise kernels.FusedKernelsUnavailable(f"fused kernel {name!r} is unavailable: test")

    monkeypatch.setattr(kernels, "load", refuse)
    ckpt, _, _ = assets
    out = tmp_path / "out"
    for script, extra in ((SAMPLE, []), (GUIDE, ["--interactive"])):
        line = _one_error_line(capsys, load_script(script), ["--checkpoint", str(ckpt), "--fused-kernels", "--out", str(out),
                                                       *extra])
        assert "unavailable" in line
    assert not out.exists() or not any(out.iterdir())
