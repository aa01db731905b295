"""What every phase uses: the run's settings, the recorder of commands and phases, and how a phase ends."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    """One invocation's choices: dry_run (tiny sizes on the CPU), out (the files that come back), work (a
    temporary folder for runs, checkpoints and the benchmark JSON), mnist (the IDX files), python, cifar
    (the folder of CIFAR-10's zips; None: the cifar10 phase skips)."""
    dry_run: bool
    out: Path
    work: Path
    mnist: Path
    python: str
    cifar: Path | None = None

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


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
        """One phase's end: a line in the log and on stdout, and phases.json rewritten with every entry so far."""
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
    """Raises PhaseFailed, in failure()'s words, unless rc is 0."""
    problem = failure(rc, what)
    if problem:
        raise PhaseFailed(problem)


def left(deadline: float) -> float:
    """Seconds until deadline (a time.monotonic() value)."""
    return deadline - time.monotonic()


def only_run_dir(parent: Path) -> Path:
    """The newest numbered output folder a stage script wrote under parent."""
    runs = sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    if not runs:
        raise PhaseFailed(f"no run directory under {parent}")
    return runs[-1]


def read_log_rows(run_dir: Path) -> list[dict]:
    """The rows of a training run's log.csv."""
    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))


def last_images_per_s(run_dir: Path) -> float | None:
    """images/s of the last log.csv row that has one (None when no row has)."""
    rows = [r for r in read_log_rows(run_dir) if r.get("images_per_s")]
    return float(rows[-1]["images_per_s"]) if rows else None
