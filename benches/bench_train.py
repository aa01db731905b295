"""One optimisation step of the U-Net: images/s and peak VRAM, eager vs fused kernels vs torch.compile.

A step is what shared/training.py does per batch, minus data loading, EMA and logging (the trainer has no
separate step function to call): q_sample at uniform t, forward, L_simple = mean ‖ε − ε̂‖² (Ho et al.
2020, Eq. 14), backward, AdamW step. bf16 means torch.autocast(bfloat16) over fp32 master weights, as
the trainer's --precision bf16 does. The zero-initialised layers get small random weights, so the
network computes on real numbers (a fresh U-Net outputs exactly 0).

Peak VRAM: torch.cuda.max_memory_allocated over one step after warm-up (optimizer state exists),
measured after torch.cuda.reset_peak_memory_stats(), less what was allocated before this benchmark built
its model (memory other benchmarks of the session still hold is not this step's).

CUDA: the mnist and cifar10 presets × {eager, fused, compile, fused+compile} × {fp32, bf16} × {128 (the
seeds' batch), a throughput batch}. CPU: the tiny preset, eager fp32 (fused kernels need a GPU there).
"""
from __future__ import annotations

import gc
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import kernels
from benches.measure import budget_skip_reason, on_cuda, randomise_zero_init, record, time_call
from shared import NoiseSchedule, UNet, q_sample

NUM_TIMESTEPS = 1000
LEARNING_RATE = 2e-4
SEEDS_BATCH = 128
THROUGHPUT_BATCH = {"mnist": 512, "cifar10": 256, "tiny": 64}
# A cold torch.compile of the U-Net's forward and backward (inductor, 16 cores), to stay in budget.
COMPILE_ESTIMATE_S = {"mnist": 70, "cifar10": 90}
VARIANTS = ["eager", "fused", "compile", "fused+compile"]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _make_step(preset: str, variant: str, precision: str, batch: int, device: torch.device):
    torch.manual_seed(0)
    model = randomise_zero_init(UNet.from_preset(preset)).to(device).train()
    if "fused" in variant:
        try:
            model.set_fused_kernels(True)
        except kernels.FusedKernelsUnavailable as err:
            pytest.skip(f"fused kernels unavailable: {err}")
    forward = torch.compile(model) if "compile" in variant else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    schedule = NoiseSchedule("linear", NUM_TIMESTEPS)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, model.in_channels, model.image_size, model.image_size, device=device,
                    generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, device=device, generator=gen)
    t = torch.randint(0, NUM_TIMESTEPS, (batch,), device=device, generator=gen)
    autocast_dtype = DTYPES[precision]
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext

    def step():
        x_t = q_sample(schedule, x0, t, noise)
        with autocast():
            eps_pred = forward(x_t, t)
        loss = F.mse_loss(eps_pred.float(), noise)  # L_simple
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _gpu_cases():
    for preset in ("mnist", "cifar10"):
        for batch in (SEEDS_BATCH, THROUGHPUT_BATCH[preset]):
            for precision in ("bf16", "fp32"):
                for variant in VARIANTS:
                    # The bar (mnist, fused bf16 vs eager bf16) first; compile variants last, bf16 first.
                    prio = 20 if "compile" not in variant else (80 if precision == "bf16" else 90)
                    if "compile" in variant and batch != SEEDS_BATCH:
                        prio += 5
                    yield pytest.param(preset, variant, precision, batch, marks=[pytest.mark.priority(prio)],
                                       id=f"{preset}-b{batch}-{precision}-{variant}")


def _cpu_cases():
    for batch in (32, THROUGHPUT_BATCH["tiny"]):
        yield pytest.param("tiny", "eager", "fp32", batch, marks=[pytest.mark.priority(20)],
                           id=f"tiny-b{batch}-fp32-eager")


@pytest.mark.parametrize("preset,variant,precision,batch", list(_gpu_cases() if on_cuda() else _cpu_cases()))
def test_train_step(benchmark, device, preset, variant, precision, batch):
    if "compile" in variant:
        reason = budget_skip_reason(COMPILE_ESTIMATE_S[preset])
        if reason:
            pytest.skip(reason)
    baseline = 0
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
    step = _make_step(preset, variant, precision, batch, device)
    warmup = 3 if "compile" in variant else 2  # compile happens in the first call, outside the timing
    for _ in range(warmup):
        step()
    peak_mib = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2 ** 20
    rounds = 10 if device.type == "cuda" else 3
    seconds = time_call(benchmark, step, device, rounds=rounds, warmup_rounds=1)
    record(benchmark, family="train", case=f"train step {preset} {precision} batch {batch}", impl=variant,
           preset=preset, dtype=precision, batch=batch)
    if seconds:
        benchmark.extra_info["images_per_s"] = batch / seconds
    if peak_mib is not None:
        benchmark.extra_info.update(peak_vram_mib=peak_mib, vram_baseline_mib=baseline / 2 ** 20)
    if device.type == "cuda":
        del step
        torch.cuda.empty_cache()
