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

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_bench.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts scripts/ on sys.path, so gpu_phases imports
    return module


def test_time_shares_fit_nine_minutes(gpu_bench):
    assert set(gpu_bench.SHARES) == set(gpu_bench.PHASES)
    assert sum(gpu_bench.SHARES.values()) == gpu_bench.TOTAL_BUDGET_S <= 9 * 60


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
