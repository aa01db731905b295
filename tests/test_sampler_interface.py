"""The sampler interface: the affine on-device step (what a CUDA graph replays) equals the eager
samplers, the loop reads nothing back from tensors per step, and CUDA graphs are refused without CUDA
and equal eager sampling where CUDA is present."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shared.diffusion.noise import seeds_tensor
from shared.diffusion.prediction import set_prediction
from shared.diffusion.samplers import GraphedSampling, SamplerOptions, make_sampler, sample_batch
from shared.diffusion.schedule import NoiseSchedule
from shared.errors import UserError
from tests.tiny_trained import one_thread, draw  # noqa: F401 (fixture)
from tests.tiny_trained import random_conditional_unet

aten = torch.ops.aten
# Ops that copy a tensor value to the host: on a GPU each one waits for the device.
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default, aten.equal.default,
              aten.nonzero.default, aten.masked_select.default}

CASES = {  # name: SamplerOptions fields
    "ddpm": dict(sampler="ddpm", guidance_scale=2.5, clip_x0=True),
    "ddpm-respaced": dict(sampler="ddpm", num_steps=5, variance="fixed_large"),
    "ddim-eta": dict(sampler="ddim", num_steps=6, eta=0.6, guidance_scale=3.0),
    "ddim-clip": dict(sampler="ddim", num_steps=6, clip_x0=True),
    "dpmpp": dict(sampler="dpmpp", num_steps=6, guidance_scale=2.0, clip_x0=True),
    "euler": dict(sampler="euler", num_steps=6, guidance_scale=2.0),
    "heun-clip": dict(sampler="heun", num_steps=5, guidance_scale=3.0, clip_x0=True),
    "ddim-interval-rescale": dict(sampler="ddim", num_steps=6, guidance_scale=3.0, guidance_interval=(0.3, 3.0),
                                  guidance_rescale=0.7),
    "heun-interval-w0": dict(sampler="heun", num_steps=4, guidance_scale=0.0, guidance_interval=(0.0, 2.0)),
}


# The Karras cases run on an exact denoiser with T = 100: on T = 20 (σ_max = 1.3e5, Heun's last correction
# spanning σ 298 → 0.07) and with an untrained U-Net their chains leave the data's range by orders of
# magnitude, and float32 rounding, done in a different order by the graph's affine form, grows with them.
ORACLE_CASES = ("euler", "heun-clip", "heun-interval-w0")


class GaussianClasses(torch.nn.Module):
    """The exact ε of class-conditional Gaussian data x0 ~ N(μ_y, s² I) [1 x 8 x 8], μ_y = (y + 1)/4 and
    μ_∅ = 0 for the null class, at fractional timesteps too (ᾱ from log σ interpolated between timesteps)."""

    in_channels, image_size, num_classes, null_class, std = 1, 8, 3, 3, 0.5

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.register_buffer("log_sigmas", schedule.sigmas.log())
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        t = t.double()
        low = t.floor().clamp(max=len(self.log_sigmas) - 2)
        log_sigma = torch.lerp(self.log_sigmas[low.long()], self.log_sigmas[low.long() + 1], t - low)
        abar = (1 / (1 + (2 * log_sigma).exp())).view(-1, 1, 1, 1)
        mean = torch.where(y == self.null_class, 0.0, (y + 1) / 4).double().view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * (x.double() - abar.sqrt() * mean) / (abar * self.std ** 2 + 1 - abar)
        return eps.to(x.dtype)


@pytest.fixture(scope="module")
def model():
    return random_conditional_unet()


def setup(case: str, model) -> tuple[NoiseSchedule, torch.nn.Module]:
    """(schedule, network) a case runs on: T = 20 and the untrained U-Net, or ORACLE_CASES' T = 100 and oracle."""
    if case not in ORACLE_CASES:
        return NoiseSchedule("linear", 20), model
    schedule = NoiseSchedule("linear", 100)
    return schedule, GaussianClasses(schedule)


@pytest.mark.parametrize("case", list(CASES))
def test_affine_device_step_equals_the_eager_sampler(model, case):
    """GraphedSampling without capture runs the exact iteration a graph replays, from the coefficient table."""
    schedule, net = setup(case, model)
    solver = make_sampler(schedule, SamplerOptions(**CASES[case]))
    seeds, labels = seeds_tensor([4, 5, 6], "cpu"), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eager = sample_batch(net, solver, seeds, labels)
        table = GraphedSampling(net, solver, capture=False).run(seeds, labels)
    torch.testing.assert_close(table, eager, rtol=1e-4, atol=1e-4)  # float32 rounding in another order


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("case", ["ddpm", "dpmpp", "heun-clip", "ddim-interval-rescale"])
def test_affine_device_step_converts_v_and_x0_outputs_like_the_eager_loop(model, case, prediction):
    """The graph's per-call table turns a v- or x0-network's output into ε as guided_eps does."""
    schedule, net = setup(case, model)
    net = set_prediction(copy.deepcopy(net), prediction)
    solver = make_sampler(schedule, SamplerOptions(**CASES[case]))
    seeds, labels = seeds_tensor([4, 5, 6], "cpu"), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eager = sample_batch(net, solver, seeds, labels)
        table = GraphedSampling(net, solver, capture=False).run(seeds, labels)
    torch.testing.assert_close(table, eager, rtol=1e-4, atol=1e-4)


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value back to the host, except reads of the noise
    schedule's own float64 tables (host constants by design: gathering a coefficient reads host memory
    and never waits for a device)."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.allowed = {t.untyped_storage().data_ptr() for t in vars(schedule).values() if torch.is_tensor(t)}
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            tensors = [a for a in args if torch.is_tensor(a)]
            if any(t.untyped_storage().data_ptr() not in self.allowed for t in tensors):
                self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_steps_read_nothing_back_from_the_device(model, case):
    schedule = NoiseSchedule("linear", 20)
    solver = make_sampler(schedule, SamplerOptions(**CASES[case]))
    seeds, labels = seeds_tensor([1, 2], "cpu"), torch.tensor([0, 2])
    counter = HostReads(schedule)
    with torch.no_grad(), counter:
        sample_batch(model, solver, seeds, labels)
    assert counter.reads == [], f"{len(counter.reads)} host reads over {len(solver.timesteps)} steps: {counter.reads[:5]}"


@pytest.mark.parametrize("case", list(CASES))
def test_the_graph_iteration_reads_nothing_back_either(model, case):
    """What a CUDA graph captures must not read the device: run uncaptured under the counter."""
    schedule = NoiseSchedule("linear", 20)
    solver = make_sampler(schedule, SamplerOptions(**CASES[case]))
    counter = HostReads(schedule)
    with torch.no_grad(), counter:
        GraphedSampling(model, solver, capture=False).run(seeds_tensor([1, 2], "cpu"), torch.tensor([0, 2]))
    assert counter.reads == [], counter.reads[:5]


def test_the_counter_sees_a_host_read(model):
    """The check above can fail: a .item() on a sampled tensor is counted."""
    schedule = NoiseSchedule("linear", 20)
    counter = HostReads(schedule)
    with counter:
        torch.randn(3).sum().item()
        float(schedule.alphas_cumprod[3])  # a schedule constant: allowed
    assert counter.reads == [str(aten._local_scalar_dense.default)]


def test_cuda_graphs_are_refused_without_cuda(model):
    with pytest.raises(UserError, match="CUDA graphs need a CUDA device"):
        draw(model, NoiseSchedule("linear", 10), [0], labels=[0], device="cpu", cuda_graphs=True, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_graph_sampling_equals_eager_sampling(model, case):
    schedule, net = setup(case, model)
    net = net.to("cuda")
    kw = dict(labels=[0, 1, 2, 1], device="cuda", batch_size=3, progress=False, **CASES[case])
    seen = []
    eager = draw(net, schedule, [3, 4, 5, 6], **kw)
    graphed = draw(net, schedule, [3, 4, 5, 6], cuda_graphs=True, callback=lambda i, t, x, x0: seen.append(t),
                     **kw)
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    assert len(seen) == 2 * len(make_sampler(schedule, SamplerOptions(**CASES[case])).timesteps)  # 2 batches
    net.to("cpu")
