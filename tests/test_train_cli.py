"""stage3_train/train.py: every bad input gives one `error:` line on stderr and a non-zero exit, and leaves
an existing run directory exactly as it was; --dry-run prints the resolved options and writes nothing."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from shared import flags
from shared.training.config import CPU_RECIPE, DEFAULT_MAX_STEPS, TrainConfig, build_parser, resolve_precision
from shared.training.loop import train
from tests.idx_files import write_idx
from tests.scripts import load_script
from tests.stage3_helpers import TRAIN_SCRIPT, edge_bar_dataset, run_train, single_thread_env, write_edge_bar_idx


script = load_script(TRAIN_SCRIPT, "stage3_train_script")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Generated IDX data, and an output folder that already holds a finished 2-step run."""
    root = tmp_path_factory.mktemp("cli")
    data = write_edge_bar_idx(root / "data", n=64)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train(TrainConfig(preset="tiny", timesteps=50, batch_size=8, heldout_size=8, max_steps=2, sample_steps=2,
                      device="cpu", out=str(root / "runs")), edge_bar_dataset(64))
    torch.set_num_threads(before)
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a directory")
    run = next((root / "runs").iterdir())
    good = (run / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 3])
    (root / "corrupt.pt").write_bytes(b"\x00garbage" * 100)
    bad_labels = edge_bar_dataset(64).labels.numpy().astype("uint8")
    bad_labels[5] = 12  # past the 10 MNIST classes (the data itself has 4)
    (root / "label12").mkdir()
    write_idx(root / "label12" / "train-images-idx3-ubyte", np.zeros((64, 8, 8), np.uint8), gz=True)
    write_idx(root / "label12" / "train-labels-idx1-ubyte", bad_labels, gz=True)
    return root, data, run


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_in_process(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flags.run_main(script.main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


BAD_INPUTS = {
    "unknown dataset": (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    "unknown preset": (["--preset", "huge"], "invalid choice: 'huge'"),
    "unknown precision": (["--precision", "fp8"], "invalid choice: 'fp8'"),
    "zero batch size": (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    "negative max steps": (["--max-steps", "-3"], "--max-steps: expected an integer >= 1"),
    "zero timesteps": (["--timesteps", "0"], "--timesteps: expected an integer in"),
    "negative heldout": (["--heldout-size", "-1"], "--heldout-size: expected an integer >= 0"),
    "epochs and steps": (["--epochs", "1", "--max-steps", "5"], "not allowed with argument"),
    "missing data dir": (["--data-dir", "{root}/nowhere"], "does not exist"),
    "data dir without images": (["--data-dir", "{root}/empty"], "mnist not found"),
    "unwritable out": (["--data-dir", "{data}", "--out", "{root}/a_file/runs"], "is not a directory"),
    "corrupt checkpoint": (["--resume", "{root}/corrupt.pt"], "corrupt"),
    "truncated checkpoint": (["--resume", "{root}/truncated.pt"], "corrupt or truncated"),
    "fp16 on cpu": (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    "cuda graphs on cpu": (["--data-dir", "{data}", "--cuda-graphs", "--device", "cpu"],
                           "--cuda-graphs cannot be used here: it needs a CUDA GPU"),
    "other preset on resume": (["--resume", "{run}", "--preset", "mnist"], "--preset mnist does not match"),
    "label out of range": (["--data-dir", "{root}/label12"], "holds label 12, outside the 10 classes"),
    "out is a run directory": (["--data-dir", "{data}", "--out", "{run}"], "is a run directory"),
    "batch larger than data": (["--data-dir", "{data}", "--heldout-size", "8", "--batch-size", "4096"],
                               "exceeds the"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_touches_nothing(case, workspace, capsys):
    root, data, run = workspace
    args, expected = BAD_INPUTS[case]
    argv = [a.format(root=root, data=data, run=run) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(root / "runs")]
    before = _snapshot(root / "runs")
    code, out, err = _run_in_process(argv + ["--device", "cpu"] if "--device" not in argv else argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert out == ""
    assert _snapshot(root / "runs") == before  # nothing new, nothing changed


def test_real_process_exit_codes(workspace):
    """The same through a real process: exit status 2 and one stderr line (argparse and UserError paths)."""
    root, data, _ = workspace
    before = _snapshot(root / "runs")
    for args, expected in ((["--batch-size", "0"], "--batch-size"),
                           (["--precision", "fp16", "--device", "cpu", "--data-dir", str(data)], "fp16")):
        proc = run_train(args + ["--out", str(root / "runs")], cwd=root)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert _snapshot(root / "runs") == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the fused kernels may well run")
def test_fused_kernels_never_fall_back_silently(workspace):
    """On a CPU (no Triton interpreter) --fused-kernels is an error, raised before any record is written."""
    root, data, _ = workspace
    before = _snapshot(root / "runs")
    env = {k: v for k, v in single_thread_env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--data-dir", str(data), "--heldout-size", "8",
                           "--batch-size", "8", "--preset", "tiny", "--max-steps", "2", "--fused-kernels",
                           "--device", "cpu",
                           "--out", str(root / "runs")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("fused" in errors[0] or "Triton" in errors[0]), proc.stderr
    assert _snapshot(root / "runs") == before


def test_dry_run_prints_resolved_options_and_writes_nothing(workspace, capsys, tmp_path):
    """On a CPU the bare command takes the CPU recipe; every flag given wins over it; --preset turns it off."""
    out = tmp_path / "never_created"
    result = script.main(["--dataset", "mnist", "--device", "cpu", "--out", str(out), "--dry-run"])
    assert result is None
    printed = json.loads(capsys.readouterr().out)
    assert printed["precision"] == resolve_precision("auto", torch.device("cpu"))
    for key in ("preset", "batch_size", "lr", "max_steps"):
        assert printed[key] == CPU_RECIPE[key], key
    assert printed["class_cond"] is True  # labelled data trains class-conditional by default
    script.main(["--device", "cpu", "--out", str(out), "--dry-run", "--batch-size", "32", "--no-class-cond"])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["batch_size"], printed["preset"], printed["class_cond"]) == (32, CPU_RECIPE["preset"], False)
    script.main(["--device", "cpu", "--out", str(out), "--dry-run", "--preset", "mnist"])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["preset"], printed["max_steps"], printed["batch_size"]) == ("mnist", DEFAULT_MAX_STEPS,
                                                                               TrainConfig().batch_size)
    assert not out.exists()


def test_flags_come_from_the_config_dataclass():
    """One flag per TrainConfig field, with the field's default; --class-cond stays accepted."""
    parser = build_parser("x")
    defaults = vars(parser.parse_args([]))
    assert defaults.pop("dry_run") is False
    assert defaults == asdict(TrainConfig())
    assert parser.parse_args(["--class-cond"]).class_cond is True
    assert parser.parse_args(["--no-class-cond"]).class_cond is False


@pytest.mark.parametrize("value", ["inf", "1e309", "nan", "-inf"])
def test_non_finite_floats_are_refused_at_parse_time(value, capsys):
    for flag in ("--lr", "--grad-clip", "--weight-decay"):
        code, out, err = _run_in_process([flag, value, "--device", "cpu", "--dry-run"], capsys)
        assert code == 2 and err.count("\n") == 1 and flag in err, err


def test_huge_seed_is_one_line(capsys):
    code, out, err = _run_in_process(["--seed", "99999999999999999999999", "--dry-run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--seed" in err, err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--early-stop-patience", "--sample-every", "--ckpt-every", "--fused-kernels", "--compile",
                 "--channels-last", "--p-uncond", "--dry-run"):
        assert flag in text, flag
    assert "(default: 128)" in text and "(default: 0.0002)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the default command trains the mnist preset")
def test_cpu_recipe_is_announced_in_one_line(workspace, capsys, tmp_path):
    root, data, _ = workspace
    result = script.main(["--data-dir", str(data), "--out", str(tmp_path / "runs"), "--max-steps", "2",
                          "--batch-size", "8", "--heldout-size", "8", "--timesteps", "50", "--sample-steps", "2",
                          "--device", "cpu", "--judge-heldout", "0"])
    err = capsys.readouterr().err
    notes = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("note: no CUDA GPU")]
    assert len(notes) == 1 and "--preset mnist" in notes[0] and "batch 8" in notes[0], err
    assert result.run_dir.name.split("-")[2] == CPU_RECIPE["preset"] and result.progress.step == 2
