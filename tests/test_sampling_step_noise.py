"""In-kernel noise of the fused DDPM / DDIM step (an InKernelNoise of seeds and stream instead of a noise tensor)
against the same step fed the op's noise tensor, and a sampler with fused kernels (which draws its
noise in-kernel) against one fed the noise tensors.

Equal means bitwise: both paths make the same float32 noise (csrc/philox.h), round it to the storage
dtype as noise.to(dtype) does, and run the same per-element update.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.sampling_step import op as sampling_step
from kernels.sampling_step import philox_op
from kernels.sampling_step.op import InKernelNoise
from shared import NoiseSchedule
from shared.diffusion.coefficients import ddim_coefficients, ddpm_coefficients
from shared.diffusion import samplers
from shared.diffusion.noise import per_sample_noise
from tests.tiny_trained import random_conditional_unet

GPU_REASON = "needs a CUDA GPU (the CUDA kernel is compiled but cannot run here)"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason=GPU_REASON))]
# numel per sample 35 (not a multiple of 4 or of any vector width) and 6,345 (two noise tiles).
SHAPES = [(3, 1, 5, 7), (2, 3, 45, 47)]
SEEDS = [2**40 + 1, 7, 123456789]


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Builds/loads the op once; a missing toolchain is a failure here, not a skip."""
    return sampling_step.load_extension()


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule("linear", 1000)


def inputs(shape, dtype, device):
    gen = torch.Generator().manual_seed(shape[-1])
    x_t, eps, eps_uncond = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    seeds = torch.tensor(SEEDS[:shape[0]], device=device)
    return x_t, eps, eps_uncond, seeds


def step(kind, schedule, x_t, eps, noise, **kw):
    """The fused step at t = 400 (DDIM: to 380 with η = 1), noise a tensor or an InKernelNoise."""
    if kind == "ddpm":
        return kernels.ddpm_step(x_t, eps, ddpm_coefficients(schedule, 400), noise, **kw)
    return kernels.ddim_step(x_t, eps, ddim_coefficients(schedule, 400, 380, 1.0), noise, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("shape", SHAPES, ids=["35 per sample", "two tiles"])
@pytest.mark.parametrize("variant", ["plain", "clip+cfg"])
def test_in_kernel_noise_equals_the_noise_tensor(schedule, device, dtype, kind, shape, variant):
    x_t, eps, eps_uncond, seeds = inputs(shape, dtype, device)
    extra = dict(clip_x0=True, eps_uncond=eps_uncond, guidance_scale=2.5) if variant != "plain" else {}
    noise = per_sample_noise(seeds, shape[1:], device, dtype, stream=9)
    want = step(kind, schedule, x_t, eps, noise, **extra)
    got = step(kind, schedule, x_t, eps, InKernelNoise(seeds, 9), **extra)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = step(kind, schedule, x_t, eps, InKernelNoise(seeds, 10), **extra)
    assert not torch.equal(other[0], want[0])  # the stream is used


def test_stream_tensor_and_zero_sigma(schedule):
    x_t, eps, _, seeds = inputs(SHAPES[0], torch.float32, "cpu")
    a = step("ddpm", schedule, x_t, eps, InKernelNoise(seeds, 3))
    b = step("ddpm", schedule, x_t, eps, InKernelNoise(seeds, torch.tensor([3])))
    assert torch.equal(a[0], b[0])
    # σ = 0 (DDPM t = 0, DDIM η = 0): the seeds are accepted and add nothing
    last = ddpm_coefficients(schedule, 0)
    plain, _ = kernels.ddpm_step(x_t, eps, last)
    assert torch.equal(kernels.ddpm_step(x_t, eps, last, InKernelNoise(seeds, 3))[0], plain)


def test_bad_in_kernel_noise_arguments(schedule):
    x_t, eps, _, seeds = inputs(SHAPES[0], torch.float32, "cpu")
    coefs = ddpm_coefficients(schedule, 400)
    with pytest.raises(RuntimeError, match="noise_seeds has 2 seeds but x_t has shape"):
        kernels.ddpm_step(x_t, eps, coefs, InKernelNoise(seeds[:2], 1))
    with pytest.raises(RuntimeError, match="seeds must be int64"):
        kernels.ddpm_step(x_t, eps, coefs, InKernelNoise(seeds.float(), 1))
    with pytest.raises(RuntimeError, match="noise_seeds and noise_stream go together"):
        torch.ops.diffusion_kernels.ddpm_step(x_t, eps, None, None, 1.0, 1.0, 0.5, 0.5, 0.5, 0.1, False, False,
                                              seeds, None)


def test_opcheck_with_in_kernel_noise():
    x_t, eps, _, seeds = inputs(SHAPES[0], torch.float32, "cpu")
    torch.library.opcheck(torch.ops.diffusion_kernels.ddim_step,
                          (x_t, eps, None, None, 1.0, 1.2, 0.6, 0.9, 0.3, 0.2, True, True, seeds, torch.tensor(4)))


@pytest.fixture(scope="module")
def model():
    return random_conditional_unet()


@pytest.mark.parametrize("name,steps,eta", [("ddpm", None, 0.0), ("ddim", 5, 0.7)])
def test_fused_sampler_draws_in_kernel_the_noise_it_would_be_fed(model, monkeypatch, name, steps, eta):
    schedule = NoiseSchedule("linear", 20)
    opts = samplers.SamplerOptions(sampler=name, num_steps=steps, eta=eta, guidance_scale=2.0, clip_x0=True,
                                   fused_step=True)
    drawn = []
    real_load = kernels.load

    def spy_load(op_name):
        real_step = real_load(op_name)

        def spy(x_t, eps, coefs, noise=None, *args, **kwargs):
            drawn.append(isinstance(noise, InKernelNoise))
            return real_step(x_t, eps, coefs, noise, *args, **kwargs)

        return spy

    assert samplers.make_sampler(schedule, opts).noise_in_kernel
    in_kernel = samplers.sample(model, schedule, [5, 6, 7], opts, labels=[0, 1, 2], progress=False)
    monkeypatch.setattr(samplers.Sampler, "noise_in_kernel", property(lambda self: False))
    fed = samplers.sample(model, schedule, [5, 6, 7], opts, labels=[0, 1, 2], progress=False)
    assert torch.equal(in_kernel, fed)
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "load", spy_load)
    samplers.sample(model, schedule, [5, 6, 7], opts, labels=[0, 1, 2], progress=False)
    assert drawn and all(drawn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON)
def test_cuda_in_kernel_noise_gives_the_cpu_bits(schedule):
    assert philox_op.available("cuda")
    x_t, eps, _, seeds = inputs(SHAPES[1], torch.float32, "cpu")
    cpu = step("ddim", schedule, x_t, eps, InKernelNoise(seeds, 5))
    gpu = step("ddim", schedule, x_t.cuda(), eps.cuda(), InKernelNoise(seeds.cuda(), 5))
    # the update itself may round differently on the GPU (no FMA either side): within 1e-6
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-6, atol=1e-6)
