"""The per-sample noise op (torch.ops.diffusion_kernels.philox_normal, kernels/sampling_step/philox_op.py)
against its eager reference (kernels/sampling_step/philox_reference.py) and the plain-Python generator
of tests/test_noise.py, and per_sample_noise's choice between them.

What "equal" means here: the op computes Box-Muller's float64 log and sincos itself, the reference
calls torch's; both round once to float32. So every value must lie within one float32 ulp of the
reference, and all but a handful (values within a few float64 ulps of a float32 rounding boundary,
about one in 10⁶) must be bitwise equal. The op against itself is bitwise: any batch, any thread
count, any x86-64 vector width, CPU and CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels.sampling_step import op as sampling_step
from kernels.sampling_step import philox_op
from kernels.sampling_step.philox_reference import philox_normal as reference_normal
from shared.diffusion import noise as noise_module
from shared.diffusion.noise import noise_impl, per_sample_noise
from tests.test_noise import reference_normals

GPU_REASON = "needs a CUDA GPU (the CUDA kernel is compiled but cannot run here)"
# At most this fraction of values may differ from the reference (by one float32 ulp each).
MAX_DIFFERING = 1e-5
SEEDS = [0, 1, 7, 2**32 - 1, 2**32, 2**40 + 3, 2**62 + 12345, 2**63 - 1]


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Builds/loads the op once; a missing toolchain is a failure here, not a skip."""
    return sampling_step.load_extension()


def op(seeds, stream, shape):
    return philox_op.philox_normal(torch.as_tensor(seeds, dtype=torch.int64), stream, shape)


def assert_matches_reference(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within one float32 ulp everywhere, bitwise but for at most MAX_DIFFERING of the values."""
    ulp = torch.nextafter(ref.abs(), torch.tensor(float("inf"))) - ref.abs()
    assert bool(((got - ref).abs() <= ulp).all()), "a value is more than one float32 ulp off the reference"
    differing = int((got != ref).sum())
    assert differing <= max(2, MAX_DIFFERING * ref.numel()), f"{differing} of {ref.numel()} values differ"


@pytest.mark.parametrize("shape", [(1,), (3,), (1, 5, 7), (3, 32, 32), (3, 61, 67)],
                         ids=["1 value", "3 values", "35 (not a multiple of 4)", "3x32x32", "past one tile"])
@pytest.mark.parametrize("stream", [0, 1, 2**32 - 1])
def test_op_matches_the_eager_reference(shape, stream):
    got = op(SEEDS, stream, shape)
    assert got.shape == (len(SEEDS), *shape) and got.dtype == torch.float32
    numel = torch.Size(shape).numel()
    ref = reference_normal(torch.tensor(SEEDS), stream, numel).reshape(got.shape)
    assert_matches_reference(got, ref)


def test_op_matches_the_python_generator():
    got = op(SEEDS, 5, (10,))  # blocks 0-2, the last one cut short
    for i, seed in enumerate(SEEDS):
        expected = torch.tensor(sum((reference_normals(seed, 5, b) for b in range(3)), [])[:10]).float()
        assert_matches_reference(got[i], expected)


def test_a_million_values_match_the_reference():
    seeds = torch.arange(1000, 1000 + 341)
    got = op(seeds, 3, (3, 32, 32))
    assert_matches_reference(got, reference_normal(seeds, 3, 3 * 32 * 32).reshape(got.shape))


def test_a_seed_gives_the_same_bits_at_any_batch_size_position_and_thread_count():
    shape = (3, 45, 47)  # 6,345 values: two tiles, the second cut short, not a multiple of 4
    alone = op([137], 7, shape)[0]
    batch = op(list(range(100, 164)), 7, shape)
    assert torch.equal(batch[37], alone)
    assert torch.equal(op([5, 137, 9], 7, shape)[1], alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(op(list(range(100, 164)), 7, shape), batch)
    finally:
        torch.set_num_threads(threads)


def test_stream_as_an_int_a_0d_or_a_1_element_tensor_is_the_same():
    a = op([3, 4], 9, (50,))
    assert torch.equal(a, op([3, 4], torch.tensor(9), (50,)))
    assert torch.equal(a, op([3, 4], torch.tensor([9]), (50,)))
    assert not torch.equal(a, op([3, 4], 10, (50,)))


def test_empty_batches_and_samples():
    assert op([], 0, (3, 4)).shape == (0, 3, 4)
    assert op([1, 2], 0, (3, 0)).shape == (2, 3, 0)


def test_bad_inputs_are_refused_in_one_line():
    raw = torch.ops.diffusion_kernels.philox_normal
    stream = torch.tensor(0)
    with pytest.raises(RuntimeError, match="seeds must be int64"):
        raw(torch.tensor([1.0]), stream, [4])
    with pytest.raises(RuntimeError, match=r"seeds must be a 1-d tensor \[N\]"):
        raw(torch.zeros(2, 2, dtype=torch.int64), stream, [4])
    with pytest.raises(RuntimeError, match="stream must be a tensor of one element"):
        raw(torch.tensor([1]), torch.tensor([1, 2]), [4])
    with pytest.raises(RuntimeError, match="stream must be int64"):
        raw(torch.tensor([1]), torch.tensor(1.0), [4])
    with pytest.raises(RuntimeError, match="sample_shape must hold sizes >= 0"):
        raw(torch.tensor([1]), stream, [-1, 4])
    with pytest.raises(RuntimeError, match="exceed the generator's 2\\^34"):
        raw(torch.tensor([1]), stream, [2**20, 2**15])
    with pytest.raises(ValueError, match="exceed the generator's 2\\^34"):
        op([1], 0, (2**20, 2**15))


def test_opcheck():
    torch.library.opcheck(torch.ops.diffusion_kernels.philox_normal,
                          (torch.tensor([1, 2**40]), torch.tensor(3), [2, 3, 5]))


def test_torch_compile_sees_the_op():
    fn = torch.compile(lambda seeds: philox_op.philox_normal(seeds, 4, (2, 6)) * 2.0, fullgraph=True)
    seeds = torch.tensor([11, 12, 13])
    assert torch.equal(fn(seeds), op(seeds, 4, (2, 6)) * 2.0)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 vector levels")
def test_every_x86_64_vector_width_gives_the_same_bits():
    """KERNELS_X86_64_LEVEL caps the vector build (AVX-512, AVX2, SSE2) in a fresh process; 0 runs the
    scalar instantiation of csrc/philox.h, the one the CUDA kernel compiles."""
    code = ("import hashlib, torch; from kernels.sampling_step import op, philox_op; op.load_extension(); "
            "x = philox_op.philox_normal(torch.arange(5), 3, (3, 33, 31)); "
            "print(hashlib.sha256(x.numpy().tobytes()).hexdigest())")
    digests = set()
    for level in ("4", "3", "1", "0"):
        env = dict(os.environ, KERNELS_X86_64_LEVEL=level, OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(result.stdout.strip())
    assert len(digests) == 1


def test_per_sample_noise_uses_the_op_when_built_and_the_reference_otherwise(monkeypatch):
    assert noise_impl("cpu") == "op"
    seeds, shape = list(range(20)), (3, 8, 8)
    from_op = per_sample_noise(seeds, shape, stream=2)
    assert torch.equal(from_op, op(seeds, 2, shape))
    monkeypatch.setattr(noise_module.philox_op, "available", lambda device: False)
    assert noise_impl("cpu") == "eager"
    eager = per_sample_noise(seeds, shape, stream=2)
    assert torch.equal(eager, reference_normal(torch.tensor(seeds), 2, 192).reshape(20, *shape))
    with pytest.raises(ValueError, match="not built"):
        per_sample_noise(seeds, shape, impl="op")
    with pytest.raises(ValueError, match="unknown noise implementation"):
        per_sample_noise(seeds, shape, impl="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON)
def test_cuda_op_gives_the_cpu_op_bits():
    if not philox_op.available("cuda"):
        pytest.fail("a GPU is present but the extension was built without CUDA")
    seeds = torch.tensor(SEEDS + list(range(100, 164)))
    for shape in ((3, 32, 32), (1, 5, 7), (3, 61, 67)):
        cpu = op(seeds, 11, shape)
        gpu = philox_op.philox_normal(seeds.cuda(), torch.tensor(11, device="cuda"), shape)
        assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(per_sample_noise(SEEDS, (3, 8, 8), "cuda", stream=1).cpu(),
                       per_sample_noise(SEEDS, (3, 8, 8), "cpu", stream=1))
