"""Every stage script against a table of bad inputs, as a user (or an attacker) would type them.

Each case must end with a non-zero exit, exactly one line on stderr, no traceback, and no file created
or changed anywhere under the test's folder (the output root, the checkpoints and the data included).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_trained import bar_patterns, save_tiny_checkpoint, write_bar_idx

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "forward": REPO / "stage1_forward" / "forward.py",
    "unet": REPO / "stage2_unet" / "unet.py",
    "train": REPO / "stage3_train" / "train.py",
    "sample": REPO / "stage4_sampling" / "sample.py",
    "guide": REPO / "stage5_guidance" / "guide.py",
    "evaluate": REPO / "stage5_guidance" / "evaluate.py",
    "serve": REPO / "stage5_guidance" / "serve.py",
}
TRAIN = ["--dataset", "mnist", "--data-dir", "{data}", "--preset", "tiny", "--batch-size", "8", "--max-steps", "2",
         "--heldout-size", "8", "--device", "cpu", "--out", "{out}"]
SAMPLE = ["--checkpoint", "{ckpt}", "--n", "2", "--steps", "3", "--device", "cpu", "--no-progress", "--out", "{out}"]
EVAL = ["--checkpoint", "{ckpt}", "--data-dir", "{data}", "--heldout", "50", "--per-class", "1",
        "--classifier-epochs", "1", "--device", "cpu", "--no-progress", "--out", "{out}"]

# (id, script, arguments): {placeholders} are filled from the fixture's files.
CASES = [
    # stage 1 and 2
    ("forward-missing-data", "forward", ["--data-dir", "{missing}", "--out", "{out}"]),
    ("forward-batch-0", "forward", ["--data-dir", "{data}", "--batch", "0", "--out", "{out}"]),
    ("unet-unknown-preset", "unet", ["--preset", "huge"]),
    ("unet-batch-0", "unet", ["--preset", "tiny", "--batch-size", "0"]),
    # stage 3
    ("train-lr-inf", "train", TRAIN + ["--lr", "inf"]),
    ("train-lr-1e309", "train", TRAIN + ["--lr", "1e309"]),
    ("train-lr-nan", "train", TRAIN + ["--lr", "nan"]),
    ("train-lr-negative", "train", TRAIN + ["--lr", "-1e-4"]),
    ("train-huge-seed", "train", TRAIN + ["--seed", "99999999999999999999999"]),
    ("train-batch-0", "train", TRAIN + ["--batch-size", "0"]),
    ("train-missing-data", "train", ["--data-dir", "{missing}", "--preset", "tiny", "--device", "cpu", "--out", "{out}"]),
    ("train-resume-missing", "train", ["--resume", "{missing}", "--device", "cpu", "--out", "{out}"]),
    ("train-resume-garbage", "train", ["--resume", "{garbage}", "--device", "cpu", "--out", "{out}"]),
    ("train-resume-ema-only", "train", ["--resume", "{ckpt}", "--device", "cpu", "--out", "{out}"]),
    ("train-out-under-a-file", "train", TRAIN[:-1] + ["{file}/runs"]),
    ("train-unknown-preset", "train", TRAIN + ["--preset", "huge"]),
    ("train-epochs-and-steps", "train", TRAIN + ["--epochs", "1"]),
    ("train-p-uncond-2", "train", TRAIN + ["--p-uncond", "2"]),
    ("train-labels-12", "train", [a if a != "{data}" else "{labels12}" for a in TRAIN] + ["--class-cond"]),
    ("train-labels-255", "train", [a if a != "{data}" else "{labels255}" for a in TRAIN] + ["--class-cond"]),
    ("train-label-10-is-the-null-class", "train", [a if a != "{data}" else "{labels10}" for a in TRAIN] + ["--class-cond"]),
    # stage 4
    ("sample-missing-checkpoint", "sample", ["--checkpoint", "{missing}", "--out", "{out}"]),
    ("sample-garbage-checkpoint", "sample", ["--checkpoint", "{garbage}", "--out", "{out}"]),
    ("sample-eta-inf", "sample", SAMPLE + ["--eta", "inf"]),
    ("sample-steps-0", "sample", SAMPLE + ["--steps", "0"]),
    ("sample-steps-past-T", "sample", SAMPLE + ["--steps", "5000"]),
    ("sample-label-11", "sample", SAMPLE + ["--label", "11"]),
    ("sample-guidance-100", "sample", SAMPLE + ["--guidance-scale", "100"]),
    ("sample-n-0", "sample", SAMPLE + ["--n", "0"]),
    ("sample-classifier-is-a-dir", "sample", SAMPLE + ["--compare-steps", "2,3", "--classifier", "{dir}",
                                                       "--data-dir", "{data}", "--heldout", "50"]),
    ("sample-nan-weights", "sample", [a if a != "{ckpt}" else "{nan_ckpt}" for a in SAMPLE]),
    # stage 5
    ("guide-digit-11", "guide", SAMPLE + ["--digit", "11"]),
    ("guide-unknown-prompt", "guide", SAMPLE + ["--prompt", "banana"]),
    ("guide-sweep-50", "guide", SAMPLE + ["--sweep", "0,1,50"]),
    ("guide-sweep-label-11", "guide", SAMPLE + ["--sweep", "0,1", "--sweep-label", "11"]),
    ("guide-no-mode", "guide", SAMPLE),
    ("guide-nan-weights", "guide", [a if a != "{ckpt}" else "{nan_ckpt}" for a in SAMPLE] + ["--digit", "3"]),
    ("evaluate-runs-0-steps", "evaluate", EVAL + ["--runs", "ddim:0"]),
    ("evaluate-runs-past-T", "evaluate", EVAL + ["--runs", "ddim:5000"]),
    ("evaluate-unknown-sampler", "evaluate", EVAL + ["--runs", "warp:3"]),
    ("evaluate-classifier-under-a-file", "evaluate", EVAL + ["--classifier", "{file}/clf.pt"]),
    ("evaluate-heldout-0", "evaluate", EVAL + ["--heldout", "0"]),
    ("evaluate-missing-data", "evaluate", [a if a != "{data}" else "{missing}" for a in EVAL]),
    ("serve-port-99999", "serve", ["--checkpoint", "{ckpt}", "--port", "99999", "--device", "cpu"]),
    ("serve-missing-checkpoint", "serve", ["--checkpoint", "{missing}", "--device", "cpu"]),
    ("serve-precision-fp64", "serve", ["--checkpoint", "{ckpt}", "--precision", "fp64", "--device", "cpu"]),
]


def _labelled_copy(folder: Path, label: int) -> Path:
    """Bar data whose first label is `label` (out of range for 10 classes, or the null class 10)."""
    images, labels = bar_patterns(64, seed=5)
    labels = labels.clone()
    labels[0] = label
    return write_bar_idx(folder, images, labels)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with everything the cases refer to; a case may create or change nothing in it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    ckpt = save_tiny_checkpoint(root / "ckpt")
    nan_ckpt_file = save_tiny_checkpoint(root / "nan_ckpt")
    state = torch.load(nan_ckpt_file, weights_only=True)
    for value in state["state_dict"].values():  # the EMA-only format of save_tiny_checkpoint
        if torch.is_floating_point(value):
            value.fill_(float("nan"))
    torch.save(state, nan_ckpt_file)
    images, labels = bar_patterns(400, seed=3)
    garbage = root / "garbage.pt"
    garbage.write_bytes(os.urandom(2048))
    (root / "a_file").write_text("not a folder\n")
    (root / "a_dir").mkdir()
    (root / "out").mkdir()
    return {
        "root": root, "ckpt": str(ckpt.parent), "nan_ckpt": str(nan_ckpt_file.parent),
        "data": str(write_bar_idx(root / "bars", images, labels)),
        "labels12": str(_labelled_copy(root / "labels12", 12)), "labels255": str(_labelled_copy(root / "labels255", 255)),
        "labels10": str(_labelled_copy(root / "labels10", 10)),
        "missing": str(root / "no_such_thing"), "garbage": str(garbage), "file": str(root / "a_file"),
        "dir": str(root / "a_dir"), "out": str(root / "out"),
    }


def _snapshot(root: Path) -> dict:
    """Every path under root; a file with its size and modification time. (A folder's own time changes
    when a script makes its output folder and removes it again on the error: nothing is left, so only
    the paths inside count.)"""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in root.rglob("*")}


@pytest.mark.parametrize("script,args", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, script, args):
    root = world["root"]
    argv = [a.format(**world) for a in args]
    before = _snapshot(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(SCRIPTS[script]), *argv], capture_output=True, text=True,
                          cwd=root, env=env, timeout=300)
    stderr = done.stderr.strip()
    assert done.returncode != 0, f"exit 0 for bad input; stdout: {done.stdout[-500:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(stderr.splitlines()) == 1, f"expected one line on stderr, got:\n{stderr[-2000:]}"
    assert stderr.startswith("error:"), stderr
    after = _snapshot(root)
    created = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    assert not created and not changed, f"created {created[:5]}, changed {changed[:5]}"
