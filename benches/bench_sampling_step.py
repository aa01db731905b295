"""The fused sampler update (kernels.ddpm_step / ddim_step, C++ on CPU, CUDA on GPU) against the eager
step of shared.diffusion.steps and torch.compile of that eager step.

Runs on CPU (the C++ op; the bar: ≥ 2× eager in every variant at 256×1×28×28 and larger on 2 cores) and
on CUDA (≥ 85 % of the copy bandwidth at the large size, ≥ 4× eager at MNIST batches). fp32 storage, as
the samplers run by default; inputs are random. The variants are the ones the scripts run: clipping
x̂0 (training's sample grids, stage 5's commands), classifier-free guidance (stage 5), η > 0.

Variants (bytes per call are the fewest a single pass can move; s = bytes per element):
    ddim                 η = 0                       read x_t, ε; write x_prev            3 · numel · s
    ddim+clip            η = 0, x̂0 clipped           read x_t, ε; write x_prev            3 · numel · s
    ddim+cfg+clip        η = 0, guidance w = 3       read x_t, ε_c, ε_u; write x_prev     4 · numel · s
    ddim+eta1+cfg+clip   η = 1, guidance, noise z    read x_t, ε_c, ε_u, z; write x_prev  5 · numel · s
    ddpm                 fixed_small, noise z        read x_t, ε, z; write x_prev         4 · numel · s
    ddpm+clip            fixed_small, noise, clip    read x_t, ε, z; write x_prev         4 · numel · s
"""
from __future__ import annotations

import os

import pytest
import torch

import kernels
from benches.measure import budget_skip_reason, module_missing, on_cuda, record, record_bandwidth, time_call
from shared import NoiseSchedule
from shared.diffusion import steps as eager_sampling
from shared.diffusion.coefficients import ddim_coefficients, ddpm_coefficients
from shared.diffusion.guidance import cfg_combine

NUM_TIMESTEPS = 1000
T_STEP, T_PREV = 500, 480          # a mid-trajectory DDIM-50 step (any t costs the same)
GUIDANCE_SCALE = 3.0
COMPILE_ESTIMATE_S = 20
#: Compiling for CPU takes minutes on a shared 2-core machine; opt in with this variable.
CPU_COMPILE_ENV = "BENCH_CPU_COMPILE"

# (label, shape) per device; "MNIST" sizes are the sampler's batch × 1×28×28.
CPU_SIZES = [("MNIST b256", (256, 1, 28, 28)), ("CIFAR b1024", (1024, 3, 32, 32))]
GPU_SIZES = [("MNIST b64", (64, 1, 28, 28)), ("MNIST b256", (256, 1, 28, 28)),
             ("CIFAR b1024", (1024, 3, 32, 32)), ("large", (4096, 3, 64, 64))]
SIZES = GPU_SIZES if on_cuda() else CPU_SIZES
# variant -> (sampler, η, guided, clip, tensors read or written per element)
MODES = {
    "ddim": ("ddim", 0.0, False, False, 3),
    "ddim+clip": ("ddim", 0.0, False, True, 3),
    "ddim+cfg+clip": ("ddim", 0.0, True, True, 4),
    "ddim+eta1+cfg+clip": ("ddim", 1.0, True, True, 5),
    "ddpm": ("ddpm", None, False, False, 4),
    "ddpm+clip": ("ddpm", None, False, True, 4),
}


def _fused_step(sampler: str):
    reason = module_missing("kernels/sampling_step/op.py")
    if reason:
        pytest.skip(reason)
    try:
        return kernels.load(f"{sampler}_step")
    except kernels.FusedKernelsUnavailable as err:
        pytest.skip(f"fused sampling step unavailable: {err}")


def _eager_call(mode, schedule, x, eps, eps_u, noise):
    sampler, eta, guided, clip, _ = MODES[mode]
    if guided:
        eps = cfg_combine(eps, eps_u, GUIDANCE_SCALE)  # classifier-free guidance, unfused
    if sampler == "ddpm":
        return eager_sampling.ddpm_step(schedule, x, eps, T_STEP, noise=noise, clip_x0=clip)
    return eager_sampling.ddim_step(schedule, x, eps, T_STEP, T_PREV, eta=eta, noise=noise, clip_x0=clip)


def _step_fn(impl: str, mode: str, schedule, x, eps, eps_u, noise):
    if impl == "eager":
        return lambda: _eager_call(mode, schedule, x, eps, eps_u, noise)
    if impl == "compile":
        if not on_cuda() and not os.environ.get(CPU_COMPILE_ENV):
            pytest.skip(f"torch.compile on CPU takes minutes on 2 shared cores; set {CPU_COMPILE_ENV}=1 to run")
        reason = budget_skip_reason(COMPILE_ESTIMATE_S)
        if reason:
            pytest.skip(reason)
        compiled = torch.compile(_eager_call, dynamic=False)
        return lambda: compiled(mode, schedule, x, eps, eps_u, noise)
    sampler, eta, guided, clip, _ = MODES[mode]
    step = _fused_step(sampler)
    cfg = dict(eps_uncond=eps_u, guidance_scale=GUIDANCE_SCALE) if guided else {}
    # The per-step scalars inside the timed call, as the eager step computes them on every call.
    if sampler == "ddpm":
        return lambda: step(x, eps, ddpm_coefficients(schedule, T_STEP), noise, clip, **cfg)
    return lambda: step(x, eps, ddim_coefficients(schedule, T_STEP, T_PREV, eta), noise, clip, **cfg)


# Eager and fused first; compile variants after every other kernel figure (they cost a compile each).
IMPLS = [pytest.param("eager", marks=pytest.mark.priority(5)), pytest.param("fused", marks=pytest.mark.priority(5)),
         pytest.param("compile", marks=pytest.mark.priority(62))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", SIZES, ids=[label for label, _ in SIZES])
def test_sampling_step(benchmark, device, ceilings, size, mode, impl):
    label, shape = size
    schedule = NoiseSchedule("linear", NUM_TIMESTEPS)
    gen = torch.Generator(device=device).manual_seed(0)
    x, eps, eps_u, noise = (torch.randn(shape, device=device, generator=gen) for _ in range(4))
    fn = _step_fn(impl, mode, schedule, x, eps, eps_u, noise)
    numel = x.numel()
    # Small CPU calls take well under 1 ms: many rounds steady the median on a loaded machine; large
    # ones take milliseconds to tens of ms. (On CUDA, do_bench sets its own repeat count.)
    rounds = 100 if numel < 1_000_000 else 20
    seconds = time_call(benchmark, fn, device, rounds=rounds, warmup_rounds=3, kernel=True)
    record(benchmark, family="step", case=f"{mode} step fp32 {label} ({'×'.join(map(str, shape))})",
           impl=impl, op=f"step_{mode}", dtype="fp32", size=label, numel=numel)
    tensors = MODES[mode][4]
    record_bandwidth(benchmark, seconds, tensors * numel * x.element_size(),
                     f"{tensors} · numel · 4 (see module docstring)", ceilings)
