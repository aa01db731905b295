"""Phase benches: pytest benches, the most important benchmarks first, within the phase's share.

Measures: every benchmark of benches/ that fits (benches/README.md); BENCH_DEADLINE tells the suite
when the share ends, and the ones that would overrun skip with their reason. Writes: the benchmark
JSON into the work folder, for the report phase. Under --dry-run: the ceilings and the sampling step only.
"""
from __future__ import annotations

import time

from gpu_phases.common import Recorder, Settings, check, left

DEADLINE_MARGIN_S = 10   # between BENCH_DEADLINE and the phase's hard limit, for pytest to write its JSON
DRY_FILES = ["benches/bench_ceilings.py", "benches/bench_sampling_step.py"]


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """pytest benches --benchmark-json=<work>/bench.json, with BENCH_DEADLINE in Unix seconds."""
    files = DRY_FILES if s.dry_run else ["benches"]
    env = {"BENCH_DEADLINE": str(int(time.time() + left(deadline) - DEADLINE_MARGIN_S))}
    cmd = [s.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--benchmark-json={s.work / 'bench.json'}",
           *files]
    check(rec.run(cmd, left(deadline), env=env), "pytest benches")
