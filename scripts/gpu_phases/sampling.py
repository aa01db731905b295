"""Phase sampling: stage4_sampling/sample.py's images/s with the fused kernels in bf16.

Measures: images/s of DDIM-50 on 4,000 digits and of DDPM-1000 on 200 (fewer, to fit the share; images/s
is per image either way). Writes: results["sampling"] (into quality.json).
"""
from __future__ import annotations

import json

from gpu_phases.common import PhaseSkipped, Recorder, Settings, check, left, only_run_dir

DDIM_SAMPLES, DDPM_SAMPLES = 4_000, 200
MAX_BATCH = 2_500
#: (sampler, steps, images) per run, on a GPU and under --dry-run.
RUNS = [("ddim", 50, DDIM_SAMPLES), ("ddpm", 1000, DDPM_SAMPLES)]
DRY_RUNS = [("ddim", 3, 8), ("ddpm", 3, 4)]


def images_per_s(s: Settings, rec: Recorder, limit_s: float, run_dir: str, run: tuple[str, int, int]) -> float:
    """One sample.py run (digit 3, the given sampler, steps and image count); its images/s."""
    sampler, steps, n = run
    out = s.work / f"sample-{sampler}"
    cmd = [s.python, "stage4_sampling/sample.py", "--checkpoint", run_dir, "--sampler", sampler,
           "--steps", str(steps), "--n", str(n), "--batch-size", str(min(n, MAX_BATCH)),
           "--label", "3", "--out", str(out), "--device", s.device, "--no-progress"]
    if not s.dry_run:
        cmd += ["--precision", "bf16", "--fused-kernels"]
    check(rec.run(cmd, limit_s), f"sample {sampler}")
    return json.loads((only_run_dir(out) / "results.json").read_text())["runs"][0]["images_per_s"]


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """Each run in turn, each given an equal part of the time left."""
    run_dir = results.get("run_dir")
    if run_dir is None:
        raise PhaseSkipped("no trained run to sample from (the train phase failed)")
    runs = DRY_RUNS if s.dry_run else RUNS
    figures = {}
    for i, (sampler, steps, n) in enumerate(runs):
        limit_s = left(deadline) / (len(runs) - i)
        figures[f"{sampler}-{steps}"] = {"n": n, "images_per_s": images_per_s(s, rec, limit_s, run_dir,
                                                                               (sampler, steps, n))}
    results["sampling"] = figures
