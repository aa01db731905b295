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
from tests.idx_files import make_mnist_dir
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
        return 0 if len(commands) <= 2 else -11

    monkeypatch.setattr(gpu_bench.Recorder, "run", fake_run)
    settings = gpu_bench.Settings(dry_run=True, out=tmp_path, work=tmp_path, mnist=tmp_path, python=sys.executable)
    with pytest.raises(gpu_bench.PhaseFailed, match=r"^bad-tensors test: killed by signal 11$"):
        kernel_tests.run(settings, gpu_bench.Recorder(tmp_path), time.monotonic() + 60, {})
    graphs, main, alone = commands
    assert graphs[-1] == kernel_tests.GRAPH_TESTS
    assert ["--deselect", kernel_tests.BAD_TENSORS_TEST + "[cuda]"] == main[main.index("--deselect"):][:2]
    assert alone[-1] == kernel_tests.BAD_TENSORS_TEST and kernel_tests.BAD_TENSORS_TEST not in main
    assert "tests/test_cuda_parity.py" in main


def test_failing_graph_tests_send_the_training_phases_eager(gpu_bench, tmp_path, monkeypatch):
    """The graphed-step tests run first and alone; when they fail, the phase says so, and the main job
    and the CIFAR-10 run train with --no-cuda-graphs (the log names the failure)."""
    commands = []

    def fake_run(self, cmd, limit_s, **kwargs):
        commands.append(cmd)
        return 1 if cmd[-1] == gpu_bench.kernel_tests.GRAPH_TESTS else 0

    monkeypatch.setattr(gpu_bench.Recorder, "run", fake_run)
    settings = gpu_bench.Settings(dry_run=False, out=tmp_path, work=tmp_path / "work", mnist=tmp_path,
                                  python=sys.executable, cifar=tmp_path / "cifar")
    results = {}
    with pytest.raises(gpu_bench.PhaseFailed, match="graphed-step tests"):
        gpu_bench.kernel_tests.run(settings, gpu_bench.Recorder(tmp_path), time.monotonic() + 60, results)
    assert results["cuda_graph_tests"]["ok"] is False
    train_commands = []
    monkeypatch.setattr(gpu_bench.Recorder, "run", fake_outputs(train_commands))
    gpu_bench.train.run(settings, gpu_bench.Recorder(tmp_path), time.monotonic() + 60, results)
    (tmp_path / "cifar").mkdir()
    gpu_bench.cifar.run(settings, gpu_bench.Recorder(tmp_path), time.monotonic() + 60, results)
    main_job, cifar_job = train_commands[0][0], train_commands[1][0]
    assert "--no-cuda-graphs" in main_job and "--no-cuda-graphs" in cifar_job
    assert "graphed-step tests" in (tmp_path / "gpu_bench.log").read_text()
    passing = []
    monkeypatch.setattr(gpu_bench.Recorder, "run", fake_outputs(passing))
    gpu_bench.train.run(settings, gpu_bench.Recorder(tmp_path), time.monotonic() + 60,
                        {"cuda_graph_tests": {"ok": True, "detail": None}})
    assert "--no-cuda-graphs" not in passing[0][0]


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


def fake_workers(commands: list, plans: list):
    """A Recorder.run for train-compare's worker: call i reports the first plans[i][0] variants it was given
    (each ok, with a log.csv in its run directory), then ends with exit code plans[i][1]."""
    def run(self, cmd, limit_s, **kwargs):
        spec = json.loads(cmd[-1])
        commands.append(spec)
        reports, rc = plans[len(commands) - 1]
        for variant in spec["variants"][:reports]:
            argv = variant["argv"]
            out = Path(argv[argv.index("--out") + 1]) / "00000-run"
            out.mkdir(parents=True)
            (out / "log.csv").write_text("step,loss,images_per_s\n20,0.2,1000\n30,0.1,2000.5\n")
            figures = {"name": variant["name"], "status": "ok", "peak_memory_gib": 1.5}
            self.log(f"train: 100%\rRESULT {json.dumps(figures)}")
        return rc
    return run


def compare_settings(gpu_bench, tmp_path, dry_run=False):
    return gpu_bench.Settings(dry_run=dry_run, out=tmp_path, work=tmp_path / "work", mnist=tmp_path / "mnist",
                              python=sys.executable)


def test_train_compare_runs_eager_and_graphs_first_at_both_batches(gpu_bench, tmp_path):
    compare = gpu_bench.train_compare
    variants = compare.worker_variants(compare_settings(gpu_bench, tmp_path))
    first = {(n, b) for n in ("eager", "graphs") for b in (128, 512)}
    assert {(v["variant"], v["batch"]) for v in variants[:4]} == first
    assert {(v["variant"], v["batch"]) for v in variants} == {(n, b) for n in compare.FLAGS for b in (128, 512)}
    assert [v["variant"] for v in variants[-2:]] == ["compile", "compile"]
    for v in variants:
        argv = v["argv"]
        assert argv[0] == "--dataset" and argv[argv.index("--batch-size") + 1] == str(v["batch"])
        assert argv[argv.index("--max-steps") + 1] == str(compare.COMPARE_STEPS)
        assert argv[-len(compare.FLAGS[v["variant"]]):] == compare.FLAGS[v["variant"]]
        assert ("--cuda-graphs" in argv) == ("graphs" in v["variant"])
        assert ("--no-cuda-graphs" in argv) != ("--cuda-graphs" in argv)  # one or the other, never auto
    assert variants[-1]["needs_s"] == compare.NEEDS_S["compile"] > variants[0]["needs_s"]


def test_train_compare_profiles_steady_steps_outside_the_last_log_row(gpu_bench):
    """The profiled iterations come after a CUDA graph's warm-up and capture, hold no log row, and leave
    the window of the last row (the figure) unprofiled."""
    from shared.training.graphed import GraphedStep
    compare = gpu_bench.train_compare
    first, count = compare.PROFILED
    profiled = range(first, first + count)
    assert first > GraphedStep.WARMUP_STEPS + 1
    assert not any(step % compare.LOG_EVERY == 0 for step in profiled)
    assert profiled[-1] <= compare.COMPARE_STEPS - compare.LOG_EVERY and compare.COMPARE_STEPS % compare.LOG_EVERY == 0


def test_a_dying_worker_costs_only_its_variant(gpu_bench, tmp_path, monkeypatch):
    compare = gpu_bench.train_compare
    commands = []
    monkeypatch.setattr(gpu_bench.Recorder, "run", fake_workers(commands, [(2, -11), (99, 0)]))
    results = {}
    with pytest.raises(gpu_bench.PhaseFailed, match=r"^train-compare: eager b512 failed$"):
        compare.run(compare_settings(gpu_bench, tmp_path), gpu_bench.Recorder(tmp_path), time.monotonic() + 60, results)
    first, second = commands
    names = [v["name"] for v in first["variants"]]
    assert names[:3] == ["eager b128", "graphs b128", "eager b512"]
    assert [v["name"] for v in second["variants"]] == names[3:]  # a fresh worker for the rest
    figures = results["train_compare"]["variants"]
    assert list(figures) == names
    assert figures["eager b512"] == {"variant": "eager", "batch": 512, "status": "failed",
                                     "detail": "worker: killed by signal 11"}
    assert figures["graphs b128"] == {"variant": "graphs", "batch": 128, "status": "ok", "peak_memory_gib": 1.5,
                                      "steps": 30, "images_per_s": 2000.5}
    assert all(f["status"] == "ok" for name, f in figures.items() if name != "eager b512")


def test_the_end_of_the_share_is_recorded_for_every_variant_left(gpu_bench, tmp_path, monkeypatch):
    """A worker stopped at the limit: the variant it ran is out of time, the rest were not started; a
    variant the worker skipped for lack of time does not fail the phase by itself."""
    compare = gpu_bench.train_compare
    commands, clock = [], {"left": 60.0}
    fake = fake_workers(commands, [(1, 124)])

    def run_then_spend(self, cmd, limit_s, **kwargs):
        clock["left"] = 0.0
        return fake(self, cmd, limit_s, **kwargs)

    monkeypatch.setattr(gpu_bench.Recorder, "run", run_then_spend)
    monkeypatch.setattr(compare, "left", lambda deadline: clock["left"])
    results = {}
    with pytest.raises(gpu_bench.PhaseFailed, match=r"^train-compare: graphs b128 out of time$"):
        compare.run(compare_settings(gpu_bench, tmp_path), gpu_bench.Recorder(tmp_path), 0.0, results)
    figures = results["train_compare"]["variants"]
    assert len(commands) == 1 and figures["eager b128"]["status"] == "ok"
    assert [f["status"] for f in figures.values()][2:] == ["skipped"] * (len(figures) - 2)
    assert "share was spent" in figures["compile b512"]["detail"]


def test_the_train_compare_dry_run_runs_the_worker(gpu_bench, tmp_path):
    """The real worker (train.py's main in-process, with the profiler hook) on the CPU: eager, 3 steps."""
    make_mnist_dir(tmp_path / "mnist", num=100, split="train")
    results = {}
    gpu_bench.train_compare.run(compare_settings(gpu_bench, tmp_path, dry_run=True), gpu_bench.Recorder(tmp_path),
                                time.monotonic() + 120, results)
    (name, figures), = results["train_compare"]["variants"].items()
    assert name == "eager b8" and figures["status"] == "ok" and figures["steps"] == 3
    assert figures["images_per_s"] > 0 and "launches_per_step" not in figures  # nothing is counted on a CPU
