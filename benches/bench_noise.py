"""Per-sample noise (Philox4x32-10 + Box-Muller, kernels/sampling_step/philox_op.py) against one
torch.randn of the same size on the same device, and the fused step drawing its noise in-kernel.

Noise, 1024 × 3 × 32 × 32 fp32 (`family="noise"`, each impl a column, ratios to torch.randn measured
in the same run):
    torch.randn        one call of the global generator: the reference cost (not per-sample)
    op                 torch.ops.diffusion_kernels.philox_normal (the C++/CUDA op)
    eager reference    the generator in tensor ops (kernels/sampling_step/philox_reference.py)

One DDPM step with noise, same size (`family="noise"`): the op's noise tensor then the fused step
("op noise + fused step", one more pass writing and reading z) against the fused step drawing z
in-kernel ("fused step, in-kernel noise"). Both give the same bits (tests/test_sampling_step_noise.py).
"""
from __future__ import annotations

import pytest
import torch

import kernels
from benches.measure import budget_skip_reason, record, time_call
from kernels.sampling_step import op as sampling_step
from kernels.sampling_step import philox_op
from kernels.sampling_step.op import InKernelNoise
from kernels.sampling_step.philox_reference import philox_normal as reference_normal
from shared import NoiseSchedule
from shared.diffusion.coefficients import ddpm_coefficients

NOISE_SHAPE = (1024, 3, 32, 32)
CASE = f"per-sample noise {'×'.join(map(str, NOISE_SHAPE))} fp32"
STEP_CASE = f"DDPM step with noise {'×'.join(map(str, NOISE_SHAPE))} fp32"
STREAM = 7
T_STEP = 500
EAGER_ESTIMATE_S = 10  # the eager reference: ~1 s a call on 2 CPU cores, 3 rounds + warm-up

_RANDN_SECONDS: dict[str, float] = {}  # the reference, measured first in the same run


def _op_or_skip(device):
    try:
        sampling_step.load_extension()
    except kernels.FusedKernelsUnavailable as err:
        pytest.skip(f"the noise op is unavailable: {err}")
    if not philox_op.available(device):
        pytest.skip(f"the extension was built without {device.type} kernels")


@pytest.mark.parametrize("impl", ["torch.randn", "op", "eager reference"])
def test_noise(benchmark, device, impl):
    n, *chw = NOISE_SHAPE
    seeds = torch.arange(n, device=device)
    if impl == "torch.randn":
        def fn():
            return torch.randn(NOISE_SHAPE, device=device)
    elif impl == "op":
        _op_or_skip(device)
        stream = torch.tensor(STREAM, device=device)

        def fn():
            return philox_op.philox_normal(seeds, stream, chw)
    else:
        reason = budget_skip_reason(EAGER_ESTIMATE_S)
        if reason:
            pytest.skip(reason)

        def fn():
            return reference_normal(seeds, STREAM, 3 * 32 * 32)
    fn()  # warm-up: allocator, first-call dispatch
    seconds = time_call(benchmark, fn, device, rounds=20 if impl != "eager reference" else 3, warmup_rounds=1,
                        kernel=True)
    record(benchmark, family="noise", case=CASE, impl=impl, op="per_sample_noise",
           elements=torch.Size(NOISE_SHAPE).numel())
    if seconds:
        if impl == "torch.randn":
            _RANDN_SECONDS[str(device)] = seconds
        elif str(device) in _RANDN_SECONDS:
            benchmark.extra_info["ratio_to_randn"] = seconds / _RANDN_SECONDS[str(device)]


@pytest.mark.parametrize("impl", ["op noise + fused step", "fused step, in-kernel noise"])
def test_step_with_noise(benchmark, device, impl):
    _op_or_skip(device)
    n, *chw = NOISE_SHAPE
    schedule = NoiseSchedule("linear", 1000)
    gen = torch.Generator(device=device).manual_seed(0)
    x, eps = (torch.randn(NOISE_SHAPE, device=device, generator=gen) for _ in range(2))
    seeds = torch.arange(n, device=device)
    stream = torch.tensor(STREAM, device=device)
    if impl == "op noise + fused step":
        def fn():
            noise = philox_op.philox_normal(seeds, stream, chw)
            return kernels.ddpm_step(x, eps, ddpm_coefficients(schedule, T_STEP), noise)
    else:
        def fn():
            return kernels.ddpm_step(x, eps, ddpm_coefficients(schedule, T_STEP), InKernelNoise(seeds, stream))
    fn()
    time_call(benchmark, fn, device, rounds=20, warmup_rounds=1, kernel=True)
    record(benchmark, family="noise", case=STEP_CASE, impl=impl, op="ddpm_step_noise", elements=x.numel())
