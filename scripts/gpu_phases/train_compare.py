"""Phase train-compare: the train phase's command for a fixed number of steps, eager and with --fused-kernels.

Measures: images/s of the whole training loop (the last log row) and peak GPU memory of each variant
(pytest benches times the bare step, --compile included). Writes: results["train_compare"] (into
quality.json); the phase fails naming each variant that did not finish. Under --dry-run: eager only,
3 steps (the fused kernels run through Triton's interpreter on a CPU, minutes).
"""
from __future__ import annotations

import json
import re

from gpu_phases.common import PhaseFailed, Recorder, Settings, last_images_per_s, left, only_run_dir
from gpu_phases.train import train_cmd

COMPARE_STEPS = 30   # steps per variant (the first ones include Triton's compiles)
DRY_STEPS = 3
VARIANTS = {"eager": [], "fused": ["--fused-kernels"]}
DRY_VARIANTS = {"eager": []}
NO_RECORDS = ["--sample-every", "100000", "--ckpt-every", "100000", "--eval-every", "100000"]

#: train.py's main() in a process that reports the peak GPU memory it allocated.
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


def one_variant(s: Settings, rec: Recorder, limit_s: float, name: str, flags: list[str]) -> dict:
    """One variant's run: {"status", and when ok "steps", "images_per_s", "peak_memory_gib"}."""
    steps = DRY_STEPS if s.dry_run else COMPARE_STEPS
    out = s.work / f"compare-{name}"
    argv = train_cmd(s, out, ["--max-steps", str(steps), *NO_RECORDS, "--log-every", str(max(1, steps // 3)),
                              *flags])[2:]
    before = rec.log_path.stat().st_size
    rc = rec.run([s.python, "-c", COMPARE_SNIPPET, json.dumps(argv)], limit_s)
    if rc != 0:
        return {"status": "out of time" if rc == 124 else f"exit {rc}"}
    peak = re.findall(r"PEAK_MEMORY_BYTES (\S+)", rec.log_path.read_text()[before:])
    return {"status": "ok", "steps": steps, "images_per_s": last_images_per_s(only_run_dir(out)),
            "peak_memory_gib": (int(peak[-1]) / 2**30) if peak and peak[-1] != "None" else None}


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """Each variant in turn, each given an equal part of the time left; fails if any did not finish."""
    variants = DRY_VARIANTS if s.dry_run else VARIANTS
    figures = {}
    for i, (name, flags) in enumerate(variants.items()):
        figures[name] = one_variant(s, rec, left(deadline) / (len(variants) - i), name, flags)
    results["train_compare"] = figures
    failed = [f"{name} {figure['status']}" for name, figure in figures.items() if figure["status"] != "ok"]
    if failed:
        raise PhaseFailed("train-compare: " + ", ".join(failed))
