"""One call that records every GPU figure of the project, phase by phase, each with a hard time share.

    OUT=<dir> python scripts/gpu_bench.py --mnist .mnist --cifar .cifar10   # on a CUDA machine: ≤ 8.5 minutes
    python scripts/gpu_bench.py --dry-run --out /tmp/gpu_dry     # the same phases at tiny sizes on a CPU

The phases run in the order of PLAN below, each within its share of the 480-second budget; a phase that
fails or runs out of time is recorded and the next one starts. What each measures and writes is in its
module's docstring (scripts/gpu_phases/). The exit code is 0 when no phase failed (each ok or skipped), 1
when one failed, 2 for bad arguments or no CUDA GPU.

What comes back fits a device machine's limits (at most 8 files, flat): gpu_bench.log, phases.json,
env.txt, quality.json, digit_grid.png, <gpu>.md, <gpu>.json, <gpu>.png. Copy them to benches/results/.

--dry-run runs every phase at tiny sizes on the CPU (`.ci/run` does, so this script cannot rot); phases
that need CUDA record that they skipped and why.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from gpu_phases import (benches, cifar, evaluate, kernel_tests, report, sampling, setup,  # noqa: E402
                        train, train_compare)
from gpu_phases.common import PhaseFailed, PhaseSkipped, Recorder, Settings  # noqa: E402
from gpu_phases.environment import cuda_available, find_cuda_home, use_work_caches, write_env  # noqa: E402

# The shares add up to 8 minutes. The benches have 25 s (the full suite's H200 figures are committed in
# benches/results/h200.md; what fits runs, most important first); setup's 55 s and the report's 10 s
# cover what the first H200 call used (50 s, 5.5 s); the main job trains until its 75 s are spent.
# train-compare's 65 s hold one worker process (imports and CUDA start-up: about 9 s on the H200) and
# eight 30-step runs of the mnist preset (eager, CUDA graphs, fused, fused+graphs at batches 128 and
# 512: about 3-5 s each with data loading and the profiled steps); a cold torch.compile variant (about
# 70 s) runs only when that much is left, and is recorded as skipped otherwise. The cifar10 phase's 85 s
# train CIFAR-10 for about 12 s and judge it at w = 1 and w = 3.
TOTAL_BUDGET_S = 480
PLAN = [
    # phase           runs                 share (s)
    ("setup",         setup.run,           55),
    ("kernel-tests",  kernel_tests.run,    80),
    ("train",         train.run,           75),
    ("evaluate",      evaluate.run,        55),
    ("sampling",      sampling.run,        30),
    ("cifar10",       cifar.run,           85),
    ("train-compare", train_compare.run,   65),
    ("benches",       benches.run,         25),
    ("report",        report.run,          10),
]
PHASES = {name: phase for name, phase, _ in PLAN}
SHARES = {name: share for name, _, share in PLAN}   # they add up to TOTAL_BUDGET_S (a test checks it)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_bench_out"), help="folder for the results ($OUT)")
    p.add_argument("--mnist", default=".mnist", help="folder with the MNIST IDX files")
    p.add_argument("--cifar", default=".cifar10", help="folder with cifar10-train.zip and cifar10-test.zip "
                                                       "(the cifar10 phase skips without it)")
    p.add_argument("--dry-run", action="store_true", help="every phase at tiny sizes on the CPU")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of the phases, in order")
    return p.parse_args(argv)


def chosen_phases(args: argparse.Namespace) -> list[str] | None:
    """The phases asked for, in order; None, after one error line, for a missing MNIST folder or an unknown phase."""
    if not Path(args.mnist).is_dir():
        print(f"error: no MNIST folder at {Path(args.mnist)} (--mnist)", file=sys.stderr)
        return None
    chosen = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in PHASES]
    if unknown:
        print(f"error: unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}", file=sys.stderr)
        return None
    return chosen


def run_phase(name: str, s: Settings, rec: Recorder, results: dict) -> None:
    """One phase within its share, recorded as ok, skipped or failed whatever it raises."""
    t0 = time.monotonic()
    try:
        PHASES[name](s, rec, t0 + SHARES[name], results)
        status, detail = "ok", ""
    except PhaseSkipped as why:
        status, detail = "skipped", str(why)
    except PhaseFailed as why:
        status, detail = "failed", str(why)
    except Exception as err:  # noqa: BLE001 - record it and go on to the next phase
        status, detail = "failed", f"{type(err).__name__}: {err}"
    rec.record(name, status, time.monotonic() - t0, detail)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = chosen_phases(args)
    if chosen is None:
        return 2
    find_cuda_home()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as work:
        s = Settings(args.dry_run, out, Path(work), Path(args.mnist).resolve(), sys.executable,
                     Path(args.cifar).resolve())
        if not s.dry_run and not cuda_available():
            print("error: no CUDA GPU here; use --dry-run to rehearse on a CPU", file=sys.stderr)
            return 2
        use_work_caches(s)
        write_env(s)
        rec = Recorder(out)
        results: dict = {"dry_run": s.dry_run, "budget_s": SHARES}
        for name in chosen:
            run_phase(name, s, rec, results)
        if "report" not in chosen:
            (out / "quality.json").write_text(json.dumps({**results, "phases": rec.phases}, indent=2, default=str))
    failed = [p["phase"] for p in rec.phases if p["status"] == "failed"]
    print(f"total {time.monotonic() - rec.start:.0f} s; " + (f"failed: {', '.join(failed)}" if failed else "all phases ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
