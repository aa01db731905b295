"""Per-sample noise: Philox4x32-10 against its published known answers and a plain-Python reference,
the normals' statistics, and independence from the batch, the stream and the other samples (through
per_sample_noise, i.e. the compiled op where it is built; tests/test_noise_op.py compares the op with
the eager reference)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kernels.sampling_step.philox_reference import (MASK32, PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1,
                                                    philox4x32, philox_normal)
from shared.diffusion.noise import per_sample_noise
from shared.errors import UserError

# Random123's kat_vectors, philox4x32 with 10 rounds: counter (4 words), key (2 words) → output (4 words).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def reference_philox(counter, key, rounds=10):
    """Philox4x32-R on Python ints, written from Salmon et al. 2011 (Sec. 3.2): unbounded ints, so
    mulhilo is a plain product split in two words."""
    c, (k0, k1) = list(counter), key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        p0, p1 = PHILOX_M0 * c[0], PHILOX_M1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & MASK32]
    return tuple(c)


def reference_normals(seed: int, stream: int, block: int) -> list[float]:
    """The 4 normals of one block, from reference_philox and Box-Muller in float64 (math module)."""
    words = reference_philox((block, 0, stream, 0), (seed & MASK32, (seed >> 32) & MASK32))
    u = [((w >> 9) * 2 + 1) * 2.0 ** -24 for w in words]
    out = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        radius = math.sqrt(-2.0 * math.log(u1))
        out += [radius * math.cos(2 * math.pi * u2), radius * math.sin(2 * math.pi * u2)]
    return out


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_matches_the_published_known_answers(counter, key, expected):
    words = philox4x32([torch.tensor([c]) for c in counter], [torch.tensor([k]) for k in key])
    assert tuple(int(w) for w in words) == expected
    assert reference_philox(counter, key) == expected


def test_philox_matches_the_python_reference_on_random_words():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.int64)
    keys = rng.integers(0, 2**32, size=(64, 2), dtype=np.int64)
    words = philox4x32([torch.from_numpy(counters[:, i]) for i in range(4)],
                       [torch.from_numpy(keys[:, i]) for i in range(2)])
    got = torch.stack(words, dim=1).tolist()
    for row, c, k in zip(got, counters.tolist(), keys.tolist()):
        assert tuple(row) == reference_philox(c, k)


def test_normals_match_the_python_reference():
    seeds = [0, 7, 2**40 + 3, 2**63 - 1]
    noise = philox_normal(torch.tensor(seeds), 5, 10)  # 10 elements: blocks 0-2, the last one cut short
    for i, seed in enumerate(seeds):
        expected = sum((reference_normals(seed, 5, b) for b in range(3)), [])[:10]
        torch.testing.assert_close(noise[i], torch.tensor(expected, dtype=torch.float32), rtol=2e-7, atol=1e-7)


def test_normal_statistics():
    """2^20 values: mean, std, tails and a Kolmogorov-Smirnov test against N(0, 1)."""
    z = per_sample_noise(range(256), (4, 32, 32), stream=3).flatten().double().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs((np.abs(z) > 3).mean() - 2 * stats.norm.sf(3)) < 5e-4  # tails present and not too heavy


def test_a_seed_gives_the_same_bits_at_any_batch_size_and_position():
    shape = (3, 32, 32)
    batch = per_sample_noise(list(range(100, 164)), shape, stream=7)
    alone = per_sample_noise([137], shape, stream=7)
    assert torch.equal(batch[37], alone[0])
    # and the other samples do not matter
    mixed = per_sample_noise([5, 137, 9], shape, stream=7)
    assert torch.equal(mixed[1], alone[0])


def test_streams_and_seeds_are_different_sequences():
    a = per_sample_noise([1, 2], (1, 28, 28), stream=0).flatten(1)
    b = per_sample_noise([1, 2], (1, 28, 28), stream=1).flatten(1)
    for x, y in ((a[0], b[0]), (a[0], a[1]), (b[0], b[1])):
        assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.15  # 784 values: |r| ~ 0.036
        assert not torch.equal(x, y)


def test_stream_as_a_device_tensor_equals_the_int():
    seeds = torch.tensor([3, 4])
    assert torch.equal(philox_normal(seeds, 9, 50), philox_normal(seeds, torch.tensor(9), 50))


def test_seeds_out_of_range_are_user_errors():
    with pytest.raises(UserError, match="seeds must lie"):
        per_sample_noise([2**63], (1, 2, 2))
    with pytest.raises(UserError, match="seeds must lie"):
        per_sample_noise([-1], (1, 2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare with the CPU")
def test_cuda_gives_the_cpu_values():
    seeds = list(range(64))
    cpu = per_sample_noise(seeds, (3, 32, 32), "cpu", stream=11)
    gpu = per_sample_noise(seeds, (3, 32, 32), "cuda", stream=11)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=4e-7, atol=4e-7)
    compiled = per_sample_noise(seeds, (3, 32, 32), "cuda", stream=11, compiled=True)
    torch.testing.assert_close(compiled.cpu(), cpu, rtol=4e-7, atol=4e-7)
