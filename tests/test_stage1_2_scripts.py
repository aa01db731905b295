"""Stage 1 and stage 2 scripts end to end on tiny settings, as a user runs them."""
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.idx_files import make_mnist_dir

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_forward_script_writes_pictures_and_passes_check(tmp_path):
    make_mnist_dir(tmp_path / "data", num=40, split="t10k")
    res = run("stage1_forward/forward.py", "--data-dir", tmp_path / "data", "--out", tmp_path / "out",
              "--schedule", "cosine", "--timesteps", "200", "--batch", "40", "--rows", "3", "--columns", "5")
    assert res.returncode == 0, res.stderr
    assert "indistinguishable from N(0, I)" in res.stdout and "ᾱ_T" in res.stdout
    grid = Image.open(tmp_path / "out" / "noising_cosine.png")
    assert grid.width > grid.height  # 5 columns of timesteps, 3 rows of images
    assert (tmp_path / "out" / "schedules.png").stat().st_size > 10_000


def test_forward_script_bad_input(tmp_path):
    res = run("stage1_forward/forward.py", "--data-dir", tmp_path / "missing")
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "does not exist" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run("stage1_forward/forward.py", "--timesteps", "0")
    assert res.returncode == 2 and "--timesteps" in res.stderr


def test_unet_script_tiny():
    res = run("stage2_unet/unet.py", "--preset", "tiny", "--batch-size", "2", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "output shape = input shape: (2, 1, 28, 28)" in res.stdout
    total = [line for line in res.stdout.splitlines() if line.startswith("total")][0]
    assert total.split()[-1] == "190,369" and "GFLOP" in res.stdout and "images/s" in res.stdout


def test_unet_script_draws_the_diagram(tmp_path):
    res = run("stage2_unet/unet.py", "--preset", "tiny", "--batch-size", "1", "--device", "cpu",
              "--diagram", tmp_path / "unet.png")
    assert res.returncode == 0, res.stderr
    image = Image.open(tmp_path / "unet.png")
    assert image.format == "PNG" and image.width > 2 * image.height  # the U is wider than tall
    assert list(tmp_path.iterdir()) == [tmp_path / "unet.png"]  # no temporary file left behind


def test_unet_script_bad_diagram_path(tmp_path):
    for bad in (tmp_path / "missing" / "unet.png", tmp_path / "unet.jpg", tmp_path):
        res = run("stage2_unet/unet.py", "--preset", "tiny", "--device", "cpu", "--diagram", bad)
        assert res.returncode == 2 and res.stderr.strip().startswith("error: --diagram")
        assert len(res.stderr.strip().splitlines()) == 1 and "U-Net preset" not in res.stdout
    assert list(tmp_path.iterdir()) == []
