"""Phase train-compare: the train phase's command for a fixed number of steps in each way train.py can run
its step: eager, with CUDA graphs, with --fused-kernels, with both, and with --compile, each at batch 128
and 512.

Measures, per variant: images/s of the whole training loop (the last log row: steps 21-30, well after a
CUDA graph's 3 warm-up steps and its capture), peak GPU memory (over the run, less what was allocated
when it began), and per step the kernel launch calls the host made (cudaLaunchKernel, cuLaunchKernel,
cudaGraphLaunch and their variants: a replayed graph is one) and the kernels the GPU ran. Those two are
counted by torch.profiler over loop iterations 12-14, each with its bookkeeping (no log row among them;
the queue is drained before them), with the counter of benches/bench_train.py (`launch_counts`); the
profiled iterations lie outside the last log row's window.

The variants run back to back in one Python process (stage3_train.train.main per variant), so imports and
CUDA start-up are paid once; the most important run first (ORDER). Each variant ends with a status:
ok; skipped, with the seconds it needed and had (NEEDS_S: a cold torch.compile; or the share was spent
before it could start); out of time (the share ended during its run); failed (an error, or the worker
process died: the rest go on in a fresh process). Writes: results["train_compare"] (into quality.json).
The phase fails naming each variant that failed or ran out of time. Under --dry-run: eager only, 3 steps,
on the CPU (the profiler runs, nothing is counted).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from gpu_phases.common import (PhaseFailed, Recorder, Settings, failure, last_images_per_s, left, only_run_dir,
                               read_log_rows)
from gpu_phases.train import train_cmd

COMPARE_STEPS = 30   # steps per variant
LOG_EVERY = 10       # log rows at steps 10, 20, 30: the figure is the last row's
PROFILED = (12, 3)   # (first loop iteration profiled, iterations): between two log rows
DRY_STEPS, DRY_LOG_EVERY, DRY_PROFILED, DRY_BATCH = 3, 1, (2, 1), 8
#: train.py's flags per variant.
FLAGS = {"eager": ["--no-cuda-graphs"], "graphs": ["--cuda-graphs"],
         "fused": ["--fused-kernels", "--no-cuda-graphs"], "fused+graphs": ["--fused-kernels", "--cuda-graphs"],
         "compile": ["--compile", "--no-cuda-graphs"]}
#: (variant, batch) in the order they run: eager and graphs first, the cold compiles last.
ORDER = [("eager", 128), ("graphs", 128), ("eager", 512), ("graphs", 512), ("fused", 128), ("fused+graphs", 128),
         ("fused", 512), ("fused+graphs", 512), ("compile", 128), ("compile", 512)]
DRY_ORDER = [("eager", DRY_BATCH)]
#: Seconds of the share a variant needs left to start: a cold torch.compile of the U-Net's forward and
#: backward (benches/bench_train.py's estimate); MIN_VARIANT_S for the others.
NEEDS_S = {"compile": 70}
MIN_VARIANT_S = 5
STOP_GRACE_S = 5     # between SIGTERM at the limit and SIGKILL: the step in flight and last.pt
NO_RECORDS = ["--sample-every", "100000", "--ckpt-every", "100000", "--eval-every", "100000"]

#: The worker: train.py's main() per variant, in one process. argv[1] is JSON {"variants": [{"name", "argv",
#: "needs_s"}], "deadline": Unix seconds, "profiled": [first iteration, iterations]}; prints one line
#: `RESULT {"name", "status", ...}` per variant as it ends.
COMPARE_SNIPPET = r"""
import gc, json, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from benches.bench_train import launch_counts
from shared.training.loop import Trainer
from stage3_train.train import main

spec = json.loads(sys.argv[1])
cuda = torch.cuda.is_available()
first, count = spec["profiled"]
profiled = {}
step_alone = Trainer.step

def stop_profiler():
    prof = profiled.pop("profiler", None)
    if prof is not None:
        prof.stop()
        if cuda:
            profiled["counts"] = launch_counts(prof.events(), profiled["steps"])

def profiled_step(self, micro_batches):
    # iterations first .. first+count-1 inside the profiler, each with its bookkeeping
    if self.progress.step + 1 == first:
        if cuda:
            torch.cuda.synchronize()  # the window holds only its own iterations' kernels
        profiled["profiler"] = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        profiled["profiler"].start()
        profiled["steps"] = 0
    elif self.progress.step + 1 == first + count:
        stop_profiler()
    profiled["steps"] = profiled.get("steps", 0) + 1
    return step_alone(self, micro_batches)

Trainer.step = profiled_step

def run(variant):
    left = spec["deadline"] - time.time()
    if left < variant["needs_s"]:
        return {"status": "skipped", "detail": f"needs about {variant['needs_s']:.0f} s, {max(left, 0):.0f} s left"}
    profiled.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    try:
        main(variant["argv"])
    except Exception as err:
        return {"status": "failed", "detail": f"{type(err).__name__}: {err}"}
    finally:
        stop_profiler()
    figures = {"status": "ok", **profiled.get("counts", {})}
    if cuda:
        figures["peak_memory_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    return figures

for variant in spec["variants"]:
    print("RESULT", json.dumps({"name": variant["name"], **run(variant)}), flush=True)
"""
RESULT_LINE = re.compile(r"RESULT (\{.*\})$", re.MULTILINE)  # (a progress bar may share its line)


def variant_name(variant: str, batch: int) -> str:
    return f"{variant} b{batch}"


def variant_out(s: Settings, variant: str, batch: int) -> Path:
    """The folder a variant's run directory goes under."""
    return s.work / f"compare-{variant.replace('+', '-')}-b{batch}"


def worker_variants(s: Settings) -> list[dict]:
    """The worker's variants in the order they run: name, train.py's argv (without the script), needs_s."""
    steps, log_every = (DRY_STEPS, DRY_LOG_EVERY) if s.dry_run else (COMPARE_STEPS, LOG_EVERY)
    variants = []
    for variant, batch in DRY_ORDER if s.dry_run else ORDER:
        extra = ["--max-steps", str(steps), *NO_RECORDS, "--log-every", str(log_every), "--batch-size", str(batch),
                 *FLAGS[variant]]
        variants.append({"name": variant_name(variant, batch), "variant": variant, "batch": batch,
                         "argv": train_cmd(s, variant_out(s, variant, batch), extra)[2:],
                         "needs_s": NEEDS_S.get(variant, MIN_VARIANT_S)})
    return variants


def run_worker(s: Settings, rec: Recorder, variants: list[dict], deadline: float) -> tuple[int, dict]:
    """One worker process over `variants` until the phase's deadline: (its exit code, {name: figures} of
    the variants it reported)."""
    limit_s = left(deadline) - STOP_GRACE_S
    spec = {"variants": [{k: v[k] for k in ("name", "argv", "needs_s")} for v in variants],
            "deadline": time.time() + limit_s, "profiled": DRY_PROFILED if s.dry_run else PROFILED}
    before = rec.log_path.stat().st_size
    rc = rec.run([s.python, "-c", COMPARE_SNIPPET, json.dumps(spec)], limit_s, grace_s=STOP_GRACE_S)
    with rec.log_path.open("rb") as f:
        f.seek(before)
        reported = [json.loads(line) for line in RESULT_LINE.findall(f.read().decode(errors="replace"))]
    return rc, {figures.pop("name"): figures for figures in reported}


def loop_figures(s: Settings, variant: dict) -> dict:
    """Steps reached and images/s of the last log row of a variant that ran."""
    try:
        run_dir = only_run_dir(variant_out(s, variant["variant"], variant["batch"]))
        return {"steps": int(read_log_rows(run_dir)[-1]["step"]), "images_per_s": last_images_per_s(run_dir)}
    except (PhaseFailed, OSError, IndexError) as err:
        return {"status": "failed", "detail": f"no log rows: {err}"}


def cut_short(rc: int) -> dict:
    """The status of the variant a worker was running when it ended with exit code rc."""
    if rc == 124:
        return {"status": "out of time", "detail": "the phase's share ended during its run"}
    return {"status": "failed", "detail": failure(rc, "worker") or "the worker reported nothing"}


def run(s: Settings, rec: Recorder, deadline: float, results: dict) -> None:
    """Workers over the variants not yet reported, while the share lasts; every variant ends recorded."""
    variants = worker_variants(s)
    pending, figures = list(variants), {}
    while pending and left(deadline) - STOP_GRACE_S >= MIN_VARIANT_S:
        rc, reported = run_worker(s, rec, pending, deadline)
        figures.update(reported)
        pending = [v for v in pending if v["name"] not in reported]
        if pending:  # the worker ended inside this one
            figures[pending.pop(0)["name"]] = cut_short(rc)
    for variant in pending:
        figures[variant["name"]] = {"status": "skipped", "detail": "not started: the phase's share was spent"}
    for variant in variants:
        name = variant["name"]
        figures[name] = {"variant": variant["variant"], "batch": variant["batch"], **figures[name]}
        if figures[name]["status"] == "ok":
            figures[name].update(loop_figures(s, variant))
        rec.log(f"train-compare {name}: " + json.dumps(figures[name]))
    results["train_compare"] = {"steps": DRY_STEPS if s.dry_run else COMPARE_STEPS, "variants": figures}
    unfinished = [f"{name} {f['status']}" for name, f in figures.items() if f["status"] in ("failed", "out of time")]
    if unfinished:
        raise PhaseFailed("train-compare: " + ", ".join(unfinished))
