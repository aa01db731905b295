"""One call that records every GPU figure of the project, phase by phase, each with a hard time share.

    OUT=<dir> python scripts/gpu_bench.py --mnist .mnist        # on a CUDA machine: ≤ 9 minutes
    python scripts/gpu_bench.py --dry-run --out /tmp/gpu_dry     # the same phases at tiny sizes on a CPU

Phases (seconds of the 520-second budget each may use; a phase that fails or runs out of time is recorded
and the next one starts):

    setup          install the project, build and load the C++/CUDA sampling-step extension
    kernel-tests   the CUDA variants of the kernel tests; the test that feeds the raw op bad tensors runs
                   last, in a process of its own, so that a crash there costs no other result
    train          the main job as a user runs it: stage3_train/train.py --dataset mnist (the mnist preset,
                   class-conditional, bf16), stopped by SIGINT when its time share is spent (it then
                   writes last.pt)
    evaluate       evaluate.py on the held-out digits at w = 1 and w = 3 (judge accuracy, FD and its
                   real-vs-real floor at 1,000 samples), and guide.py's digit grid
    sampling       images/s of DDIM-50 on 5,000 digits and of DDPM-1000 on 250 digits (fused kernels, bf16)
    train-compare  the same training for a fixed number of steps, eager and --fused-kernels (images/s of
                   the whole loop and peak GPU memory; benches times the bare step, --compile included)
    benches        pytest benches, sharing its time through BENCH_DEADLINE
    report         <gpu>.md/.json/.png from the benchmark JSON, and quality.json

What comes back fits a device machine's limits (at most 8 files, flat): gpu_bench.log, phases.json,
env.txt, quality.json, digit_grid.png, <gpu>.md, <gpu>.json, <gpu>.png. Copy them to benches/results/.

--dry-run runs every phase at tiny sizes on the CPU (`.ci/run` does, so this script cannot rot); phases
that need CUDA record that they skipped and why.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 520

# name → seconds; the shares add up to TOTAL_BUDGET_S (a test checks it).
SHARES = {
    "setup": 60,
    "kernel-tests": 80,
    "train": 110,
    "evaluate": 55,
    "sampling": 35,
    "train-compare": 50,
    "benches": 115,
    "report": 15,
}
# Time a SIGINT'd training run gets to finish its step and write last.pt before it is killed.
TRAIN_STOP_GRACE_S = 15
EVAL_PER_CLASS = 100           # 10 classes × 100 = 1,000 samples per evaluation run
COMPARE_STEPS = 40             # train-compare: steps per variant (the first ones include Triton's compiles)
DDIM_SAMPLES, DDPM_SAMPLES = 5_000, 250


@dataclass
class Settings:
    dry_run: bool
    out: Path
    work: Path
    mnist: Path
    python: str

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


# --------------------------------------------------------------------------------------------------
# Running commands with a hard limit, recording each


class Recorder:
    """Appends every command's output to gpu_bench.log and keeps one status entry per phase."""

    def __init__(self, out: Path):
        self.log_path = out / "gpu_bench.log"
        self.status_path = out / "phases.json"
        self.phases: list[dict] = []
        self.start = time.monotonic()
        self.log_path.write_text("")

    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def run(self, cmd: list[str], limit_s: float, env: dict | None = None, stop_signal: int = signal.SIGTERM,
            grace_s: float = 10) -> int:
        """Runs cmd with its output in the log; at limit_s sends stop_signal, and SIGKILL grace_s later.
        Returns the exit code (124 when it was stopped at the limit)."""
        self.log(f"$ {' '.join(map(str, cmd))}   (limit {limit_s:.0f} s)")
        with self.log_path.open("a") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True)
            try:
                return proc.wait(timeout=max(1.0, limit_s))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, stop_signal)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return 124

    def record(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        entry = {"phase": name, "status": status, "seconds": round(seconds, 1), "detail": detail}
        self.phases.append(entry)
        self.log(f"--- {name}: {status} in {seconds:.0f} s {detail}")
        print(f"{name}: {status} in {seconds:.0f} s {detail}".rstrip(), flush=True)
        self.status_path.write_text(json.dumps({"phases": self.phases,
                                                "elapsed_s": round(time.monotonic() - self.start, 1)}, indent=2))


class PhaseFailed(Exception):
    """A phase's command failed; the message says which and how."""


class PhaseSkipped(Exception):
    """A phase cannot run here (e.g. it needs CUDA); the message says why."""


def failure(rc: int, what: str) -> str | None:
    """How a command with exit code rc failed, in words; None when it succeeded."""
    if rc == 124:
        return f"{what}: out of time"
    if rc < 0:
        return f"{what}: killed by signal {-rc}"
    if rc != 0:
        return f"{what}: exit {rc}"
    return None


def check(rc: int, what: str) -> None:
    problem = failure(rc, what)
    if problem:
        raise PhaseFailed(problem)


# --------------------------------------------------------------------------------------------------
# The phases. Each takes (settings, recorder, deadline: a time.monotonic() value) and may fill `results`.


def left(deadline: float) -> float:
    return deadline - time.monotonic()


def phase_setup(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    if not s.dry_run:
        env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"), "MAX_JOBS": "16"}
        check(rec.run([s.python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                      left(deadline) - 15, env=env), "pip install")
    probe = "import kernels; kernels.load('ddim_step'); print('sampling-step extension loads')"
    check(rec.run([s.python, "-c", probe], left(deadline)), "extension load")


#: The test that calls the raw op with malformed tensors: on CUDA it has crashed the process (SIGSEGV)
#: instead of raising, so it runs last and alone, its CPU case first (the same build's CPU kernel).
BAD_TENSORS_TEST = "tests/test_sampling_step_ext.py::test_op_rejects_bad_tensors"


def phase_kernel_tests(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    # The CUDA variants only (their ids carry "cuda"); under --dry-run they skip with their reason, which
    # still exercises this phase's plumbing. The C++/CUDA op's files first: they run in seconds, the
    # Triton ones compile a kernel per shape.
    pytest = [s.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    cmd = pytest + ["-k", "cuda", "--deselect", BAD_TENSORS_TEST + "[cuda]", "tests/test_sampling_step_ext.py",
                    "tests/test_noise_op.py", "tests/test_sampling_step_noise.py", "tests/kernels",
                    "--ignore=tests/kernels/test_compile_targets.py"]
    rc = rec.run(cmd, left(deadline) - 10)
    if rc == 5:  # pytest: nothing collected
        raise PhaseFailed("no CUDA kernel test was collected")
    alone = rec.run(pytest + ["-v", BAD_TENSORS_TEST], left(deadline))  # -v: which device crashed
    problems = [p for p in (failure(rc, "kernel tests"), failure(alone, "bad-tensors test")) if p]
    if problems:
        raise PhaseFailed("; ".join(problems))


def train_cmd(s: Settings, out: Path, extra: list[str]) -> list[str]:
    cmd = [s.python, "stage3_train/train.py", "--dataset", "mnist", "--data-dir", str(s.mnist), "--out", str(out),
           "--class-cond", "--device", s.device, "--seed", "0"]
    if s.dry_run:
        cmd += ["--preset", "tiny", "--batch-size", "8", "--heldout-size", "16", "--sample-steps", "3",
                "--eval-every", "2", "--ckpt-every", "2", "--precision", "fp32"]
    else:
        cmd += ["--preset", "mnist", "--precision", "bf16"]
    return cmd + extra


def only_run_dir(parent: Path) -> Path:
    runs = sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    if not runs:
        raise PhaseFailed(f"no run directory under {parent}")
    return runs[-1]


def read_log_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))


def phase_train(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    out = s.work / "train"
    if s.dry_run:
        # a tiny run to completion, then a second one stopped by SIGINT: the same stop the GPU run uses
        check(rec.run(train_cmd(s, out, ["--max-steps", "4"]), left(deadline)), "train")
    else:
        budget = left(deadline) - TRAIN_STOP_GRACE_S
        until_stopped = ["--max-steps", "100000", "--sample-every", "100000", "--ckpt-every", "500",
                         "--eval-every", "500", "--log-every", "50"]
        rc = rec.run(train_cmd(s, out, until_stopped), budget, stop_signal=signal.SIGINT,
                     grace_s=TRAIN_STOP_GRACE_S)
        if rc not in (0, 124, 130):
            check(rc, "train")
    run_dir = only_run_dir(out)
    rows = [r for r in read_log_rows(run_dir) if r.get("images_per_s")]
    results["train"] = {"run_dir": run_dir.name, "steps": int(read_log_rows(run_dir)[-1]["step"]),
                        "images_per_s": float(rows[-1]["images_per_s"]) if rows else None,
                        "final_loss": read_log_rows(run_dir)[-1].get("loss")}
    results["run_dir"] = str(run_dir)


def phase_evaluate(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    run_dir = results.get("run_dir")
    if run_dir is None:
        raise PhaseSkipped("no trained run to evaluate (the train phase failed)")
    per_class = ["--per-class", "1", "--classifier-epochs", "1", "--heldout", "500", "--runs", "ddim:3"] if s.dry_run \
        else ["--per-class", str(EVAL_PER_CLASS), "--runs", "ddim:50", "--batch-size", "1000"]
    figures = {}
    for w in ("1", "3"):
        out = s.work / f"evaluate-w{w}"
        cmd = [s.python, "stage5_guidance/evaluate.py", "--checkpoint", run_dir, "--data-dir", str(s.mnist),
               "--classifier", str(s.work / "classifier.pt"), "--guidance-scale", w, "--out", str(out),
               "--device", s.device, "--no-progress", *per_class]
        check(rec.run(cmd, left(deadline) / (2 if w == "1" else 1.3)), f"evaluate w={w}")
        report = json.loads((only_run_dir(out) / "results.json").read_text())
        figures[f"w{w}"] = report
    results["evaluate"] = figures
    grid = [s.python, "stage5_guidance/guide.py", "--checkpoint", run_dir, "--grid", "--n", "1" if s.dry_run else "10",
            "--steps", "3" if s.dry_run else "50", "--guidance-scale", "3", "--out", str(s.work / "grid"),
            "--device", s.device, "--no-progress"]
    check(rec.run(grid, left(deadline)), "digit grid")
    pngs = sorted((s.work / "grid").rglob("*.png"))
    if pngs:
        shutil.copy(pngs[0], s.out / "digit_grid.png")


def phase_sampling(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    run_dir = results.get("run_dir")
    if run_dir is None:
        raise PhaseSkipped("no trained run to sample from (the train phase failed)")
    # (sampler, steps, images): DDPM-1000 runs on fewer digits to fit its share; images/s is per image.
    runs = [("ddim", 3, 8), ("ddpm", 3, 4)] if s.dry_run else [("ddim", 50, DDIM_SAMPLES), ("ddpm", 1000, DDPM_SAMPLES)]
    figures = {}
    for i, (sampler, steps, n) in enumerate(runs):
        out = s.work / f"sample-{sampler}"
        cmd = [s.python, "stage4_sampling/sample.py", "--checkpoint", run_dir, "--sampler", sampler,
               "--steps", str(steps), "--n", str(n), "--batch-size", str(min(n, 2500)),
               "--label", "3", "--out", str(out), "--device", s.device, "--no-progress"]
        if not s.dry_run:
            cmd += ["--precision", "bf16", "--fused-kernels"]
        check(rec.run(cmd, left(deadline) / (len(runs) - i)), f"sample {sampler}")
        report = json.loads((only_run_dir(out) / "results.json").read_text())
        figures[f"{sampler}-{steps}"] = {"n": n, "images_per_s": report["runs"][0]["images_per_s"]}
    results["sampling"] = figures


COMPARE_SNIPPET = """
import json, sys, torch
from stage3_train.train import main
argv = json.loads(sys.argv[1])
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
main(argv)
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("PEAK_MEMORY_BYTES", peak)
"""


def phase_train_compare(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    variants = {"eager": [], "fused": ["--fused-kernels"]}
    if s.dry_run:
        variants = {"eager": []}  # fused (Triton interpreter) and compile are minutes on a CPU
    steps = 3 if s.dry_run else COMPARE_STEPS
    figures = {}
    for i, (name, flags) in enumerate(variants.items()):
        out = s.work / f"compare-{name}"
        argv = train_cmd(s, out, ["--max-steps", str(steps), "--sample-every", "100000", "--ckpt-every", "100000",
                                  "--eval-every", "100000", "--log-every", str(max(1, steps // 3)), *flags])[2:]
        before = rec.log_path.stat().st_size
        rc = rec.run([s.python, "-c", COMPARE_SNIPPET, json.dumps(argv)], left(deadline) / (len(variants) - i))
        if rc != 0:
            figures[name] = {"status": "out of time" if rc == 124 else f"exit {rc}"}
            continue
        tail = rec.log_path.read_text()[before:]
        peak = re.findall(r"PEAK_MEMORY_BYTES (\S+)", tail)
        rows = [r for r in read_log_rows(only_run_dir(out)) if r.get("images_per_s")]
        figures[name] = {"status": "ok", "steps": steps,
                         "images_per_s": float(rows[-1]["images_per_s"]) if rows else None,
                         "peak_memory_gib": (int(peak[-1]) / 2**30) if peak and peak[-1] != "None" else None}
    results["train_compare"] = figures
    failed = [f"{name} {figure['status']}" for name, figure in figures.items() if figure["status"] != "ok"]
    if failed:
        raise PhaseFailed("train-compare: " + ", ".join(failed))


def phase_benches(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    files = ["benches/bench_ceilings.py", "benches/bench_sampling_step.py"] if s.dry_run else ["benches"]
    margin = 10
    env = {"BENCH_DEADLINE": str(int(time.time() + left(deadline) - margin))}
    cmd = [s.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--benchmark-json={s.work / 'bench.json'}",
           *files]
    check(rec.run(cmd, left(deadline), env=env), "pytest benches")


def device_slug(s: Settings) -> str:
    if s.dry_run:
        return "dry-run-cpu"
    import torch

    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def phase_report(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    results["phases"] = rec.phases
    (s.out / "quality.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    bench = s.work / "bench.json"
    if not bench.is_file():
        raise PhaseSkipped("no benchmark JSON (the benches phase failed); quality.json is written")
    slug = device_slug(s)
    note = "Recorded by scripts/gpu_bench.py" + (" --dry-run" if s.dry_run else "") + "; phases: " + "; ".join(
        f"{p['phase']} {p['status']}" for p in rec.phases)
    check(rec.run([s.python, "benches/report.py", str(bench), "--out", str(s.out / f"{slug}.md"),
                   "--json-out", str(s.out / f"{slug}.json"), "--png", str(s.out / f"{slug}.png"), "--note", note],
                  left(deadline)), "report")


PHASES = {
    "setup": phase_setup,
    "kernel-tests": phase_kernel_tests,
    "train": phase_train,
    "evaluate": phase_evaluate,
    "sampling": phase_sampling,
    "train-compare": phase_train_compare,
    "benches": phase_benches,
    "report": phase_report,
}


# --------------------------------------------------------------------------------------------------


def write_env(s: Settings) -> None:
    lines = [time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())]
    for cmd in (["nvidia-smi"], [s.python, "-c", "import sys, torch, triton; print('python', sys.version.split()[0], "
                                 "'| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', "
                                 "triton.__version__, '| gpu', torch.cuda.get_device_name(0) if "
                                 "torch.cuda.is_available() else None)"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            lines.append(done.stdout + done.stderr)
        except (OSError, subprocess.TimeoutExpired) as err:
            lines.append(f"{cmd[0]}: {err}")
    (s.out / "env.txt").write_text("\n".join(lines))


def find_cuda_home() -> None:
    """nvcc on PATH may be a launcher outside the toolkit: CUDA_HOME is the folder with lib64/libcudart.so."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or nvcc is None:
        return
    for cand in (Path(nvcc).parent / "../cuda", Path(nvcc).parent / "..", Path("/usr/local/cuda")):
        if (cand / "lib64/libcudart.so").exists() or (cand / "lib/libcudart.so").exists():
            os.environ["CUDA_HOME"] = str(cand.resolve())
            return


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_bench_out"), help="folder for the results ($OUT)")
    p.add_argument("--mnist", default=".mnist", help="folder with the MNIST IDX files")
    p.add_argument("--dry-run", action="store_true", help="every phase at tiny sizes on the CPU")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of the phases, in order")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mnist = Path(args.mnist)
    if not mnist.is_dir():
        print(f"error: no MNIST folder at {mnist} (--mnist)", file=sys.stderr)
        return 2
    chosen = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in PHASES]
    if unknown:
        print(f"error: unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}", file=sys.stderr)
        return 2
    find_cuda_home()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as work:
        s = Settings(args.dry_run, out, Path(work), mnist.resolve(), sys.executable)
        if not s.dry_run:
            import torch

            if not torch.cuda.is_available():
                print("error: no CUDA GPU here; use --dry-run to rehearse on a CPU", file=sys.stderr)
                return 2
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(s.work / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(s.work / "triton")
        write_env(s)
        rec = Recorder(out)
        results: dict = {"dry_run": s.dry_run, "budget_s": SHARES}
        for name in chosen:
            t0 = time.monotonic()
            deadline = t0 + SHARES[name]
            try:
                PHASES[name](s, rec, deadline, results)
                status, detail = "ok", ""
            except PhaseSkipped as why:
                status, detail = "skipped", str(why)
            except PhaseFailed as why:
                status, detail = "failed", str(why)
            except Exception as err:  # noqa: BLE001 - record it and go on to the next phase
                status, detail = "failed", f"{type(err).__name__}: {err}"
            rec.record(name, status, time.monotonic() - t0, detail)
        if "report" not in chosen:
            (out / "quality.json").write_text(json.dumps({**results, "phases": rec.phases}, indent=2, default=str))
    failed = [p["phase"] for p in rec.phases if p["status"] == "failed"]
    print(f"total {time.monotonic() - rec.start:.0f} s; " + (f"failed: {', '.join(failed)}" if failed else "all phases ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
