"""Training throughput: one optimisation step of the U-Net (eager vs fused kernels vs torch.compile vs CUDA
graphs), and the trainer's whole step loop before and after its hot-loop work, in the same run.

A step (test_train_step) is the trainer's step, shared.training.loop.GradientStep, minus data and
logging: t and ε drawn, q_sample, forward, L_simple = mean ‖ε − ε̂‖² (Ho et al. 2020, Eq. 14), backward,
the gradient clip, fused AdamW, the EMA and the skip counters, on one fixed batch of an unconditional
U-Net. Each variant builds it as train.py does: eager, fused (--fused-kernels), compile (--compile, the
forwards through torch.compile) draw t and ε from a torch.Generator; graphs (--cuda-graphs) and
fused+graphs draw them from graphed.CounterDraws, step a capturable fused AdamW whose lr GraphedStep
makes a device tensor, and replay the whole step as one CUDA graph (graphed.GraphedStep, timed after its
eager warm-up and capture). bf16 means torch.autocast(bfloat16) over fp32 master weights, as the trainer's --precision
bf16 does. The zero-initialised layers get small random weights, so the network computes on real numbers
(a fresh U-Net outputs exactly 0).

Launches per step (CUDA): torch.profiler (CPU and CUDA activities) over PROFILED_STEPS steps after the
timing, the queue drained first; `launches_per_step` counts the host's launch calls (cudaLaunchKernel,
cuLaunchKernel, cudaGraphLaunch and their variants: a replayed graph is one), `kernels_per_step` the
kernels the GPU ran (a graph's kernels counted one by one). launch_counts is also what
scripts/gpu_phases/train_compare.py counts the trainer's loop with.

The loop (test_train_loop) times STEPS_PER_CALL consecutive training steps including the data, the EMA
and the skip logic, both ways:
  before: a DataLoader over the in-memory dataset (per-sample __getitem__ + collate), the loss and the
          gradient norm read on the host every step to decide a skip (two syncs), foreach AdamW, and
          AveragedModel's EMA (whose update reads its counter on the host);
  after:  shared.training: the split gathered on the device by index (batches.Batches), and
          loop.GradientStep (no host sync: fused AdamW masked by found_inf, device-masked EMA).
Both draw from the same data and settings; the `after` row records images/s and its ratio to `before`.

Peak VRAM: torch.cuda.max_memory_allocated over the warm-up calls and one more step (the optimizer's
state is made in the first; a CUDA graph's capture allocates its activations once, and a replay
allocates nothing, so one step after the capture alone would miss them), measured after
torch.cuda.reset_peak_memory_stats(), less what was allocated before this benchmark built its model
(memory other benchmarks of the session still hold is not this step's).

CUDA: the mnist and cifar10 presets × {eager, fused, graphs, fused+graphs, compile, fused+compile} ×
{fp32, bf16} × {128 (the seeds' batch), a throughput batch}. CPU: the tiny preset, eager fp32 (fused
kernels need a GPU there); the graphs variants are listed and skip (CUDA graphs need CUDA).
"""
from __future__ import annotations

import gc
import math
import re
from contextlib import nullcontext

import pytest
import torch
from torch.autograd import DeviceType
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

import kernels
from benches.measure import budget_skip_reason, on_cuda, randomise_zero_init, record, time_call
from shared import NoiseSchedule, UNet
from shared.data.datasets import DatasetInfo, TensorImageDataset
from shared.model.ema import make_ema
from shared.model.precision import autocast as autocast_for
from shared.training.batches import Batches, ResumableSampler
from shared.training.config import CPU_RECIPE, resolve_precision
from shared.training.graphed import CounterDraws, GraphedStep
from shared.training.loop import GradientStep
from shared.training.loss import drop_labels, l_simple
from shared.training.state import TrainState

NUM_TIMESTEPS = 1000
LEARNING_RATE = 2e-4
MAX_GRAD_NORM = 1.0
SEEDS_BATCH = 128
THROUGHPUT_BATCH = {"mnist": 512, "cifar10": 256, "tiny": 64}
# A cold torch.compile of the U-Net's forward and backward (inductor, 16 cores), to stay in budget.
COMPILE_ESTIMATE_S = {"mnist": 70, "cifar10": 90}
VARIANTS = ["eager", "fused", "graphs", "fused+graphs", "compile", "fused+compile"]
PROFILED_STEPS = 3   # steps inside torch.profiler for the launch counts, after the timing
# The CUDA runtime and driver calls that launch work: kernels (cudaLaunchKernel, cudaLaunchKernelExC,
# cuLaunchKernel, cuLaunchKernelEx, cooperative launches) and whole graphs (cudaGraphLaunch).
LAUNCH_CALL = re.compile(r"^cu(da)?(LaunchKernel|LaunchCooperativeKernel|GraphLaunch)")


def launch_counts(events, steps: int) -> dict:
    """Per step, from torch.profiler's events (CPU and CUDA activities) of `steps` steps: the launch calls
    the host made (LAUNCH_CALL) and the kernels the GPU ran (device events other than copies and fills)."""
    launches = sum(1 for e in events if LAUNCH_CALL.match(e.name))
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA and e.activity_type in (None, "kernel")
                  and not e.name.startswith(("Memcpy", "Memset")))
    return {"launches_per_step": launches / steps, "kernels_per_step": kernels / steps}


def profiled_launches(fn, steps: int = PROFILED_STEPS) -> dict:
    """launch_counts of `steps` calls of fn on CUDA, the queue drained before them."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
    return launch_counts(prof.events(), steps)


def _model(preset: str, variant: str, device: torch.device, **overrides) -> UNet:
    torch.manual_seed(0)
    model = randomise_zero_init(UNet.from_preset(preset, **overrides)).to(device).train()
    if "fused" in variant:
        try:
            model.set_fused_kernels(True)
        except kernels.FusedKernelsUnavailable as err:
            pytest.skip(f"fused kernels unavailable: {err}")
    return model


def _make_step(preset: str, variant: str, precision: str, batch: int, device: torch.device, **overrides):
    """The trainer's step (loop.GradientStep) for the variant, and a call that runs it on one fixed batch.
    overrides: U-Net options that replace the preset's.

    graphs: as train.py --cuda-graphs builds it: t, ε from CounterDraws, fused AdamW capturable (the
    GraphedStep gives it a device-tensor lr), the whole step replayed after its warm-up and capture."""
    model = _model(preset, variant, device, **overrides)
    graphed = "graphs" in variant
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True, capturable=graphed)
    state = TrainState(model, make_ema(model), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       torch.amp.GradScaler(device.type, enabled=False), torch.Generator(device).manual_seed(0),
                       torch.Generator().manual_seed(0), device)
    shape = (model.in_channels, model.image_size, model.image_size)
    draws = CounterDraws(0, batch, shape, NUM_TIMESTEPS, 1, device) if graphed else None
    step = GradientStep(state, torch.compile(model) if "compile" in variant else model,
                        NoiseSchedule("linear", NUM_TIMESTEPS).to(device), autocast_for(device, precision),
                        MAX_GRAD_NORM, draws=draws)
    step = GraphedStep(step) if graphed else step
    gen = torch.Generator(device=device).manual_seed(0)
    micro_batches = [(torch.rand(batch, *shape, device=device, generator=gen) * 2 - 1,
                      torch.zeros(batch, dtype=torch.long, device=device))]
    return lambda: step(micro_batches)


def _warmup_calls(variant: str) -> int:
    """Calls before any measurement: torch.compile compiles in the first; a GraphedStep runs its eager
    warm-up, then captures."""
    if "graphs" in variant:
        return GraphedStep.WARMUP_STEPS + 2
    return 3 if "compile" in variant else 2


def _gpu_cases():
    for preset in ("mnist", "cifar10"):
        for batch in (SEEDS_BATCH, THROUGHPUT_BATCH[preset]):
            for precision in ("bf16", "fp32"):
                for variant in VARIANTS:
                    # The bar (mnist, fused bf16 vs eager bf16) and the graphs first; compile variants last,
                    # bf16 first.
                    prio = 20 if "compile" not in variant else (80 if precision == "bf16" else 90)
                    if "compile" in variant and batch != SEEDS_BATCH:
                        prio += 5
                    yield pytest.param(preset, variant, precision, batch, marks=[pytest.mark.priority(prio)],
                                       id=f"{preset}-b{batch}-{precision}-{variant}")


def _cpu_cases():
    for batch in (32, THROUGHPUT_BATCH["tiny"]):
        yield pytest.param("tiny", "eager", "fp32", batch, marks=[pytest.mark.priority(20)],
                           id=f"tiny-b{batch}-fp32-eager")
    for variant in ("graphs", "fused+graphs"):
        yield pytest.param("tiny", variant, "fp32", 32, id=f"tiny-b32-fp32-{variant}",
                           marks=[pytest.mark.priority(20), pytest.mark.skip(reason="CUDA graphs need CUDA")])


def _peak_vram_mib(step, baseline: int) -> float:
    """Peak memory since the last reset (the warm-up: a replayed CUDA graph allocates nothing, its
    activations live in the pool its capture made) and over one more step, less `baseline`, in MiB."""
    torch.cuda.synchronize()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2 ** 20


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
    if device.type == "cuda":  # the peak over the warm-up (a CUDA graph's capture included) and one step
        torch.cuda.reset_peak_memory_stats()
    for _ in range(_warmup_calls(variant)):
        step()
    peak_mib = _peak_vram_mib(step, baseline) if device.type == "cuda" else None
    rounds = 10 if device.type == "cuda" else 3
    seconds = time_call(benchmark, step, device, rounds=rounds, warmup_rounds=1)
    record(benchmark, family="train", case=f"train step {preset} {precision} batch {batch}", impl=variant,
           preset=preset, dtype=precision, batch=batch)
    if seconds:
        benchmark.extra_info["images_per_s"] = batch / seconds
    if peak_mib is not None:
        benchmark.extra_info.update(peak_vram_mib=peak_mib, vram_baseline_mib=baseline / 2 ** 20,
                                    **profiled_launches(step))
    if device.type == "cuda":
        del step
        torch.cuda.empty_cache()


# The CPU recipe's step as train.py runs it on a CPU (bf16 autocast where the CPU has it, the recipe's
# batch; unconditional, labels cost nothing here) with the `cpu` preset and with the same layout at
# 32/64/64 channels with resampling convs, the network stage 3's README compares it with.
CPU_RECIPE_LAYOUTS = {"32/64/64 with resampling convs": dict(base_channels=32, channel_mult=(1, 2, 2),
                                                             conv_resample=True),
                      "cpu preset": {}}


@pytest.mark.parametrize("layout", list(CPU_RECIPE_LAYOUTS))
def test_cpu_recipe_step(benchmark, device, layout):
    if device.type != "cpu":
        pytest.skip("the CPU recipe's network on a CPU")
    precision, batch = resolve_precision("auto", device), CPU_RECIPE["batch_size"]
    step = _make_step(CPU_RECIPE["preset"], "eager", precision, batch, device, **CPU_RECIPE_LAYOUTS[layout])
    step()
    seconds = time_call(benchmark, step, device, rounds=15, warmup_rounds=2)
    record(benchmark, family="cpu_recipe", case=f"train step cpu recipe {precision} batch {batch}", impl=layout,
           preset=CPU_RECIPE["preset"], dtype=precision, batch=batch)
    if seconds:
        benchmark.extra_info["images_per_s"] = batch / seconds


# --------------------------------------------------------------------------------------------------
# The trainer's step loop, before and after (data on the device, no host sync per step)

LOOP_DATASET_SIZE = 2048
LOOP_BATCH = {"tiny": 128, "mnist": 32 if not on_cuda() else 128}   # CPU: the mnist preset runs ~1 step/s at 32
STEPS_PER_CALL = {"tiny": 8, "mnist": 2 if not on_cuda() else 20}
LOOP_RESULTS: dict[str, float] = {}  # preset → images/s of `before`, for the ratio in the `after` row


def _loop_parts(preset: str, device: torch.device):
    """Fresh model, optimizer inputs and data for one loop variant (identical for both)."""
    torch.manual_seed(0)
    model = randomise_zero_init(UNet.from_preset(preset, num_classes=10)).to(device).train()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (LOOP_DATASET_SIZE, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (LOOP_DATASET_SIZE,), generator=gen)
    data = TensorImageDataset(pixels, labels, DatasetInfo("mnist", "train", 10, (1, 28, 28), "random bytes"))
    return model, data, NoiseSchedule("linear", NUM_TIMESTEPS)


def _before_loop(preset: str, device: torch.device):
    """The trainer as it was: DataLoader, two host reads per step to decide a skip, AveragedModel EMA."""
    model, data, schedule = _loop_parts(preset, device)
    batch = LOOP_BATCH[preset]
    sampler = ResumableSampler(data, 1, 0, seed=0)
    loader = DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    noise_gen = torch.Generator(device).manual_seed(0)
    batches = iter(())

    def steps():
        nonlocal batches
        for _ in range(STEPS_PER_CALL[preset]):
            try:
                x0, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x0, y = next(batches)
            x0, y = x0.to(device), drop_labels(y.to(device), 0.1, model.null_class, noise_gen)
            loss = l_simple(model, schedule, x0, y, generator=noise_gen).mean()
            if math.isfinite(loss.item()):                                     # host sync 1
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()  # host sync 2
                if math.isfinite(norm):
                    optimizer.step()
                    ema.update_parameters(model)                                # syncs on its counter
            optimizer.zero_grad(set_to_none=True)

    return steps


def _after_loop(preset: str, device: torch.device):
    """shared.training as it is: device-resident batches and the sync-free GradientStep."""
    model, data, schedule = _loop_parts(preset, device)
    batches = Batches(data, LOOP_BATCH[preset], 1, 0, 0, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
    state = TrainState(model, make_ema(model), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                       torch.amp.GradScaler(device.type, enabled=False), torch.Generator(device).manual_seed(0),
                       batches.loader_gen, device)
    step = GradientStep(state, model, schedule, nullcontext(), max_grad_norm=1.0, p_uncond=0.1)
    epoch, stream = 0, iter(())

    def steps():
        nonlocal epoch, stream
        for _ in range(STEPS_PER_CALL[preset]):
            try:
                x0, y = next(stream)
            except StopIteration:
                stream, epoch = batches.epoch(epoch, 0), epoch + 1
                x0, y = next(stream)
            step([(x0, y)])
        state.skipped_total.item()  # the log-row read that ends a window (once per call, not per step)

    return steps


@pytest.mark.parametrize("preset", ["tiny", "mnist"])
@pytest.mark.parametrize("impl", ["before", "after"])
def test_train_loop(benchmark, device, preset, impl):
    steps = (_before_loop if impl == "before" else _after_loop)(preset, device)
    steps()  # warm-up outside the timing: optimizer state, allocator
    seconds = time_call(benchmark, steps, device, rounds=3 if device.type == "cpu" else 10, warmup_rounds=0)
    images = LOOP_BATCH[preset] * STEPS_PER_CALL[preset]
    record(benchmark, family="train_loop", case=f"train loop {preset} fp32 batch {LOOP_BATCH[preset]}",
           impl=impl, preset=preset, dtype="fp32", batch=LOOP_BATCH[preset], steps_per_call=STEPS_PER_CALL[preset])
    if seconds:
        benchmark.extra_info["images_per_s"] = images / seconds
        if impl == "before":
            LOOP_RESULTS[preset] = images / seconds
        elif preset in LOOP_RESULTS:
            benchmark.extra_info["after_vs_before"] = images / seconds / LOOP_RESULTS[preset]
