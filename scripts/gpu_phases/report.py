"""Phase report: quality.json, then benches/report.py on the benchmark JSON.

Writes: quality.json (every phase's figures and statuses so far) and <gpu>.md, <gpu>.json, <gpu>.png
(the benchmark report, named after the GPU; dry-run-cpu under --dry-run). Skips the report, with
quality.json written, when the benches phase left no JSON.
"""
from __future__ import annotations

import json
import re

import torch

from gpu_phases.common import PhaseSkipped, Recorder, Settings, check, left


def device_slug(s: Settings) -> str:
    """The report's file name: the GPU's name in lower case without "nvidia" (e.g. h200)."""
    if s.dry_run:
        return "dry-run-cpu"
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def write_quality(s: Settings, rec: Recorder, results: dict) -> None:
    """quality.json: the phases' figures and every phase's status."""
    results["phases"] = rec.phases
    (s.out / "quality.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """quality.json, then the report, whose note names every phase's status."""
    write_quality(s, rec, results)
    bench = s.work / "bench.json"
    if not bench.is_file():
        raise PhaseSkipped("no benchmark JSON (the benches phase failed); quality.json is written")
    slug = device_slug(s)
    note = "Recorded by scripts/gpu_bench.py" + (" --dry-run" if s.dry_run else "") + "; phases: " + "; ".join(
        f"{p['phase']} {p['status']}" for p in rec.phases)
    check(rec.run([s.python, "benches/report.py", str(bench), "--out", str(s.out / f"{slug}.md"),
                   "--json-out", str(s.out / f"{slug}.json"), "--png", str(s.out / f"{slug}.png"), "--note", note],
                  left(deadline)), "report")
