"""The eager PyTorch reference of the per-sample noise generator (Philox4x32-10 + Box-Muller): the
ground truth of the philox_normal op (csrc/philox.h), and what runs where the extension is not built.

Sample i with seed s draws its noise for stream k (x_T is stream 0, sampler step j draws stream
j + 1) from Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"):

    key     (k0, k1) = (s mod 2³², ⌊s / 2³²⌋ mod 2³²)       the sample's seed
    counter (c0, c1, c2, c3) = (j, 0, k, 0)                  block j of the sample, stream k
    output  4 uint32 words = Philox4x32-10(counter, key) → 4 normals (Box-Muller on two pairs)

Element 4j + m of a sample (C·H·W elements, row-major) is normal m of block j. Every value is a pure
function of (seed, stream, element index): the noise of image i never depends on the batch it is drawn
in, nor on the other samples, and all samples of a batch are made in one vectorised pass of tensor ops
on the output's device, with no host copy.

uint32 arithmetic is emulated in int64: the 32×32 → 64-bit products of Philox's mulhilo are split in
16-bit halves so no product exceeds 2⁴⁸ (no signed overflow anywhere). The integer words are exact on
every device; the Box-Muller transform runs in float64 (torch's log, cos, sin) and is rounded once to
float32. The op computes its own float64 log and sincos from IEEE-exact operations, so it and this
reference agree bitwise but for values within a few float64 ulps of a float32 rounding boundary (about
one value in 10⁶), which differ by one float32 ulp.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

# Philox4x32 round constants (Salmon et al. 2011, Sec. 3.2; Random123's philox.h).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key schedule: golden ratio and √3 − 1, as 32-bit fractions
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
# Uniforms from the top 23 bits: u = (2m + 1)·2⁻²⁴ is exact in float32/64 and lies in (0, 1), so
# log(u) is finite; the largest |z| is √(−2 log 2⁻²⁴) ≈ 5.77.
UNIFORM_BITS = 23
# Streams longer than this many blocks per sample would reuse counters (c0 is 32 bits).
MAX_BLOCKS = 2**32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a·m, a int64 in [0, 2³²), m a 32-bit constant.

    a·m = a·m_hi·2¹⁶ + a·m_lo with both partial products < 2⁴⁸, so int64 never overflows.
    """
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    s = p_lo + ((p_hi & 0xFFFF) << 16)  # the low 48 bits of the product, plus a carry into bit 48
    return (p_hi >> 16) + (s >> 32), s & MASK32


def philox4x32(counter: Sequence[torch.Tensor | int], key: Sequence[torch.Tensor | int],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32-R (Random123's philox4x32_R) on int64 tensors holding uint32 words.

    counter: 4 words, key: 2 words, each an int64 tensor (broadcastable to each other) or an int in
    [0, 2³²). Returns the 4 output words as int64 tensors in [0, 2³²) of the broadcast shape.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r > 0:  # the key is bumped before every round but the first
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """A uint32 word → float64 uniform in (0, 1) from its top UNIFORM_BITS bits."""
    return ((word >> (32 - UNIFORM_BITS)) * 2 + 1).to(torch.float64) * 2.0 ** -(UNIFORM_BITS + 1)


def _box_muller(w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint32 words → two independent N(0, 1) in float64 (Box & Muller 1958)."""
    radius = (-2.0 * _uniform(w0).log()).sqrt()
    angle = (2.0 * math.pi) * _uniform(w1)
    return radius * angle.cos(), radius * angle.sin()


def _philox_normal_blocks(seeds: torch.Tensor, stream: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """float32 [N x B x 4]: the 4 normals of Philox block block[j] of (seeds[i], stream).

    seeds: int64 [N]; stream: int64, one element (0-d or [1]); block: int64 [B] = arange(B). Every
    tensor comes in as an argument (torch.compile turns an arange made inside into index arithmetic
    with integer divisions, several times slower).
    """
    key0 = (seeds & MASK32).unsqueeze(1)                                   # [N, 1]
    key1 = ((seeds >> 32) & MASK32).unsqueeze(1)                           # [N, 1]
    words = philox4x32((block.unsqueeze(0), 0, stream & MASK32, 0), (key0, key1))  # 4 × [N, B]
    z0, z1 = _box_muller(words[0], words[1])
    z2, z3 = _box_muller(words[2], words[3])
    return torch.stack((z0, z1, z2, z3), dim=-1).to(torch.float32)         # [N, B, 4]


@functools.cache
def _compiled_blocks():
    """_philox_normal_blocks fused into one kernel by torch.compile (instead of ~150 tensor ops)."""
    return torch.compile(_philox_normal_blocks, dynamic=True, fullgraph=True)


def stream_tensor(stream: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The stream as an int64 tensor on device: a tensor passes through, an int is filled there (no
    host-to-device copy)."""
    if torch.is_tensor(stream):
        return stream
    return torch.full((), int(stream), dtype=torch.int64, device=device)


def philox_normal(seeds: torch.Tensor, stream: int | torch.Tensor, numel: int, compiled: bool = False) -> torch.Tensor:
    """Standard normals [N x numel] in float32 on seeds' device: row i from (seeds[i], stream) alone.

    seeds: int64 [N] in [0, 2⁶³). stream: an int in [0, 2³²), or an int64 tensor of one element (0-d
    or [1]) on seeds' device (what a captured CUDA graph reads). Element e of row i is normal e mod 4
    of Philox block e // 4 (module docstring). compiled: run the fused torch.compile kernel instead of
    eager tensor ops.
    """
    blocks = -(-numel // 4)
    if blocks > MAX_BLOCKS:
        raise ValueError(f"{numel} elements per sample exceed the generator's 2^34 per stream")
    device = seeds.device
    stream = stream_tensor(stream, device)
    block = torch.arange(blocks, dtype=torch.int64, device=device)
    make = _compiled_blocks() if compiled else _philox_normal_blocks
    return make(seeds, stream, block).reshape(seeds.shape[0], blocks * 4)[:, :numel]
