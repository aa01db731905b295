"""Sampling throughput: images/s of DDPM-1000 and DDIM-50 (η = 0).

Every variant runs the samplers' own loop (`shared.diffusion.samplers.sample_batch`, or its CUDA-graph
form `GraphedSampling`): per step ε̂ = model(x_t, t), then the sampler's update, with each sample's
noise from its seed (Philox on the device). Variants:
    eager         eager U-Net, eager step (shared.diffusion.steps)
    fused step    eager U-Net, fused step (kernels.ddpm_step / ddim_step)
    fused         fused U-Net kernels + fused step: what `sample.py --fused-kernels` runs
    graphs        fused U-Net kernels, the U-Net + on-device step of one iteration captured once as a
                  CUDA graph and replayed: what `sample.py --fused-kernels --cuda-graphs` runs
The zero-initialised layers get small random weights (a fresh U-Net outputs exactly 0).

Every step of a sampler costs the same (same shapes), so a run is timed over its first `steps_timed`
steps and scaled: images/s = batch / (time of steps_timed steps × total steps / steps_timed). Both
step counts are in extra_info. CUDA: the `mnist` preset at batches 1, 64, 1024. CPU: the `tiny` preset
at batches 1 and 16, eager and fused step.

The cost of per-sample noise on its own is benches/bench_noise.py's.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from benches.measure import budget_skip_reason, on_cuda, randomise_zero_init, record, time_call
from shared import NoiseSchedule, UNet
from shared.diffusion.noise import seeds_tensor
from shared.diffusion.samplers import GraphedSampling, SamplerOptions, make_sampler, sample_batch

NUM_TIMESTEPS = 1000
SAMPLERS = {"DDPM-1000": ("ddpm", NUM_TIMESTEPS), "DDIM-50": ("ddim", 50)}
PRESET = "mnist" if on_cuda() else "tiny"
BATCHES = (1, 64, 1024) if on_cuda() else (1, 16)
VARIANTS = ["eager", "fused step", "fused", "graphs"] if on_cuda() else ["eager", "fused step"]
# Steps timed per run: the whole DDIM-50 where it is cheap; 20 steps of DDPM-1000 (scaled ×50).
# CPU (tiny preset, batches 1 and 16): 5 steps of each, so a CPU run stays quick on 2 cores.
STEPS_TIMED = {("DDIM-50", 1): 50 if on_cuda() else 5, ("DDIM-50", 64): 50, ("DDIM-50", 1024): 10,
               ("DDPM-1000", 1): 20 if on_cuda() else 5, ("DDPM-1000", 64): 20, ("DDPM-1000", 1024): 10,
               ("DDIM-50", 16): 5, ("DDPM-1000", 16): 5}
# Seconds of warm-up + timing (graph capture included) per case; skipped when the budget is short.
ESTIMATE_S = 15


def _build(variant: str, sampler: str, batch: int, steps_timed: int, device: torch.device):
    torch.manual_seed(0)
    model = randomise_zero_init(UNet.from_preset(PRESET)).to(device).eval()
    if variant in ("fused", "graphs"):
        try:
            model.set_fused_kernels(True)
        except kernels.FusedKernelsUnavailable as err:
            pytest.skip(f"fused kernels unavailable: {err}")
    name, steps = SAMPLERS[sampler]
    opts = SamplerOptions(sampler=name, num_steps=steps, fused_step=variant in ("fused step", "fused"))
    try:
        solver = make_sampler(NoiseSchedule("linear", NUM_TIMESTEPS), opts)
    except kernels.FusedKernelsUnavailable as err:
        pytest.skip(f"fused sampling step unavailable: {err}")
    seeds = seeds_tensor(range(batch), device)
    if variant == "graphs":
        graphed = GraphedSampling(model, solver)
        return lambda: graphed.run(seeds, None, max_steps=steps_timed)
    return lambda: sample_batch(model, solver, seeds, None, max_steps=steps_timed)


def _cases():
    for sampler in SAMPLERS:
        for batch in BATCHES:
            for variant in VARIANTS:
                # The bar (DDIM-50, batch 64, fused vs eager) first.
                prio = 25 if (sampler, batch) == ("DDIM-50", 64) else 40
                yield pytest.param(sampler, batch, variant, marks=[pytest.mark.priority(prio)],
                                   id=f"{sampler}-b{batch}-{variant.replace(' ', '_')}")


@pytest.mark.parametrize("sampler,batch,variant", list(_cases()))
def test_sampling(benchmark, device, sampler, batch, variant):
    reason = budget_skip_reason(ESTIMATE_S)
    if reason:
        pytest.skip(reason)
    steps_timed = STEPS_TIMED[(sampler, batch)]
    fn = torch.no_grad()(_build(variant, sampler, batch, steps_timed, device))
    fn()  # warm-up: kernels compiled and autotuned, allocator grown, graph captured
    rounds = 3 if device.type == "cuda" else 2
    seconds = time_call(benchmark, fn, device, rounds=rounds, warmup_rounds=1)
    total_steps = SAMPLERS[sampler][1]
    record(benchmark, family="sampling", case=f"{sampler} {PRESET} fp32 batch {batch}", impl=variant,
           sampler=sampler, batch=batch, preset=PRESET, steps_timed=steps_timed, steps_total=total_steps)
    if seconds:
        benchmark.extra_info["images_per_s"] = batch / (seconds * total_steps / steps_timed)
