"""scripts/gpu_bench.py (its phases in scripts/gpu_phases/): the phase budget, and that one failing or
slow phase never stops the others.

The whole script runs at tiny sizes in `.ci/run` (`--dry-run`); these tests pin its bookkeeping.
"""
import importlib.util
import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from shared.data.datasets import load_dataset
from tests.test_cifar import make_cifar_zip

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_bench.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts scripts/ on sys.path, so gpu_phases imports
    return module


def test_time_shares_fit_eight_minutes(gpu_bench):
    assert set(gpu_bench.SHARES) == set(gpu_bench.PHASES)
    assert sum(gpu_bench.SHARES.values()) == gpu_bench.TOTAL_BUDGET_S <= 8 * 60


def test_a_failing_phase_is_recorded_and_the_next_runs(gpu_bench, tmp_path, monkeypatch):
    ran = []

    def boom(s, rec, deadline, results):
        ran.append("boom")
        raise RuntimeError("broken on purpose")

    def skip(s, rec, deadline, results):
        ran.append("skip")
        raise gpu_bench.PhaseSkipped("needs CUDA")

    def fine(s, rec, deadline, results):
        ran.append("fine")
        results["fine"] = 1

    monkeypatch.setattr(gpu_bench, "PHASES", {"setup": boom, "kernel-tests": skip, "train": fine})
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    rc = gpu_bench.main(["--dry-run", "--out", str(tmp_path / "out"), "--mnist", str(mnist),
                         "--phases", "setup,kernel-tests,train"])
    assert rc == 1 and ran == ["boom", "skip", "fine"]
    phases = json.loads((tmp_path / "out" / "phases.json").read_text())["phases"]
    assert [(p["phase"], p["status"]) for p in phases] == [("setup", "failed"), ("kernel-tests", "skipped"),
                                                           ("train", "ok")]
    assert "broken on purpose" in phases[0]["detail"] and phases[1]["detail"] == "needs CUDA"
    quality = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert quality["fine"] == 1


def test_a_command_past_its_limit_is_stopped(gpu_bench, tmp_path):
    """The hard limit holds even for a child that ignores the first signal (SIGKILL follows)."""
    rec = gpu_bench.Recorder(tmp_path)
    ignore = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('started', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    rc = rec.run([sys.executable, "-c", ignore], limit_s=2, stop_signal=signal.SIGINT, grace_s=1)
    assert rc == 124 and time.monotonic() - t0 < 20
    assert "started" in rec.log_path.read_text()


def test_bad_arguments_are_one_line(gpu_bench, tmp_path, capsys):
    assert gpu_bench.main(["--dry-run", "--out", str(tmp_path), "--mnist", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "m").mkdir()
    assert gpu_bench.main(["--dry-run", "--out", str(tmp_path), "--mnist", str(tmp_path / "m"),
                           "--phases", "setup,warp-drive"]) == 2
    assert "warp-drive" in capsys.readouterr().err


def test_a_crash_in_the_bad_tensors_test_costs_no_other_kernel_test(gpu_bench, tmp_path, monkeypatch):
    """The raw op's bad-input test runs after the others, in a process of its own: a SIGSEGV there is
    named in the phase's detail, and the main kernel-test run neither includes it nor waits for it.
    The main run includes the CUDA parity tests."""
    kernel_tests = gpu_bench.kernel_tests
    commands = []

    def fake_run(self, cmd, limit_s, **kwargs):
        commands.append(cmd)
        return 0 if len(commands) == 1 else -11

    monkeypatch.setattr(gpu_bench.Recorder, "run", fake_run)
    settings = gpu_bench.Settings(dry_run=True, out=tmp_path, work=tmp_path, mnist=tmp_path, python=sys.executable)
    with pytest.raises(gpu_bench.PhaseFailed, match=r"^bad-tensors test: killed by signal 11$"):
        kernel_tests.run(settings, gpu_bench.Recorder(tmp_path), time.monotonic() + 60, {})
    main, alone = commands
    assert ["--deselect", kernel_tests.BAD_TENSORS_TEST + "[cuda]"] == main[main.index("--deselect"):][:2]
    assert alone[-1] == kernel_tests.BAD_TENSORS_TEST and kernel_tests.BAD_TENSORS_TEST not in main
    assert "tests/test_cuda_parity.py" in main


def fake_outputs(commands: list, rc: int = 0):
    """A Recorder.run that records (cmd, limit_s, kwargs) and leaves what train.py / evaluate.py would."""
    def run(self, cmd, limit_s, **kwargs):
        commands.append((cmd, limit_s, kwargs))
        out = Path(cmd[cmd.index("--out") + 1]) / "00000-run"
        out.mkdir(parents=True, exist_ok=True)
        if "stage3_train/train.py" in cmd:
            (out / "log.csv").write_text("step,loss,images_per_s\n25,0.1,2000.5\n")
        else:
            w = float(cmd[cmd.index("--guidance-scale") + 1])
            run_row = {"mean_class_accuracy": 0.25 * w, "per_class_accuracy": {}, "frechet_distance": 9.0,
                       "real_floor": 1.5, "inception_score": 2.0, "images_per_s": 900.0, "num_samples": 1000}
            (out / "results.json").write_text(json.dumps({"classifier_accuracy": 0.84, "heldout_images": 10000,
                                                          "runs": [run_row]}))
        return rc
    return run


def test_the_cifar10_phase_trains_for_its_share_then_judges_at_w1_and_w3(gpu_bench, tmp_path, monkeypatch):
    cifar = gpu_bench.cifar
    commands = []
    monkeypatch.setattr(gpu_bench.Recorder, "run", fake_outputs(commands))
    (tmp_path / "cifar").mkdir()
    settings = gpu_bench.Settings(dry_run=False, out=tmp_path, work=tmp_path / "work", mnist=tmp_path,
                                  python=sys.executable, cifar=tmp_path / "cifar")
    share = gpu_bench.SHARES["cifar10"]
    results = {}
    cifar.run(settings, gpu_bench.Recorder(tmp_path), time.monotonic() + share, results)
    (train, train_limit, train_kw), (w1, w1_limit, _), (w3, _, _) = commands
    assert train[train.index("--dataset") + 1] == "cifar10" and "--no-random-flip" not in train
    assert train[train.index("--data-dir") + 1] == str(tmp_path / "cifar") and "bf16" in train
    budget_s = 60 * float(train[train.index("--minutes") + 1])
    assert budget_s == pytest.approx(share * cifar.TRAIN_FRACTION - cifar.START_UP_S - cifar.TRAIN_STOP_GRACE_S, abs=1)
    assert train_limit + train_kw["grace_s"] == pytest.approx(share * cifar.TRAIN_FRACTION, abs=1)
    assert train_kw["stop_signal"] == signal.SIGINT
    for cmd, w in ((w1, "1"), (w3, "3")):
        assert "--no-inception-fid" in cmd and cmd[cmd.index("--guidance-scale") + 1] == w
        assert cmd[cmd.index("--classifier") + 1] == str(tmp_path / "work" / "cifar-classifier.pt")
        assert cmd[cmd.index("--runs") + 1] == "ddim:50" and cmd[cmd.index("--per-class") + 1] == "100"
    assert w1_limit == pytest.approx(cifar.FIRST_EVAL_FRACTION * share, abs=1)  # (the fake training took no time)
    figures = results["cifar10"]
    assert figures["train"]["steps"] == 25 and figures["train"]["images_per_s"] == 2000.5
    assert figures["w1"]["classifier_accuracy"] == 0.84 and figures["w3"]["mean_class_accuracy"] == 0.75
    assert figures["w1"]["real_floor"] == 1.5 and figures["w3"]["images_per_s"] == 900.0


def test_the_cifar10_phase_skips_without_its_folder(gpu_bench, tmp_path):
    (tmp_path / "mnist").mkdir()
    rc = gpu_bench.main(["--dry-run", "--out", str(tmp_path / "out"), "--mnist", str(tmp_path / "mnist"),
                         "--cifar", str(tmp_path / "absent"), "--phases", "cifar10"])
    phases = json.loads((tmp_path / "out" / "phases.json").read_text())["phases"]
    assert rc == 0 and phases[0]["status"] == "skipped" and str(tmp_path / "absent") in phases[0]["detail"]


def test_the_dry_run_judges_a_small_copy_of_the_zips(gpu_bench, tmp_path, monkeypatch):
    make_cifar_zip(tmp_path / "full", "train", per_class=3)
    make_cifar_zip(tmp_path / "full", "test", per_class=2)
    monkeypatch.setattr(gpu_bench.cifar, "DRY_PER_CLASS", {"train": 2, "test": 1})
    small = gpu_bench.cifar.dry_run_copy(tmp_path / "full", tmp_path / "work")
    train, test = load_dataset("cifar10", str(small)), load_dataset("cifar10", str(small), train=False)
    full = load_dataset("cifar10", str(tmp_path / "full"))
    assert len(train) == 20 and len(test) == 10 and torch.bincount(train.labels).tolist() == [2] * 10
    assert torch.equal(train.images[:2], full.images[:2])  # the first files of each class, bytes as they were
