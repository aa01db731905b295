"""U-Net building blocks: time embedding, residual block with FiLM, self-attention, resampling.

Blocks that need the conditioning embedding subclass `EmbeddingBlock` and take `(x, emb)`; the others
take `x` alone.  `EmbeddingSequential` chains both kinds and hands the embedding to those that ask for
it, so the U-Net calls each of its blocks the same way (improved-diffusion's TimestepBlock idea).

The two fusable spots, GroupNorm+FiLM(+SiLU) and attention, go through `GroupNormAct` and
`SelfAttention`, which call either the eager references in `kernels.reference` or the fused kernels,
depending on a switch the U-Net sets on all of them at once. For attention "fused" means the faster
of the project's Triton kernel and torch's scaled_dot_product_attention at the layer's size
(TRITON_ATTENTION_FASTER).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import reference

# The (sequence length L, head dim d) pairs at which the fused U-Net runs the project's Triton attention
# (kernels.attention) rather than torch's scaled_dot_product_attention: those where the Triton kernel's
# forward+backward beat SDPA on a GPU. On the H200 (benches/results/h200.md, the attention rows) SDPA won
# at every size measured, L = 49 … 1,024 with d = 64 (the Triton kernel ran at 0.14–0.29× its speed), so
# the set is empty (SDPA given contiguous q, k, v, as `attend` gives it); `python scripts/gpu_bench.py`
# measures both again, and a size it shows the Triton kernel winning belongs here.
TRITON_ATTENTION_FASTER: frozenset[tuple[int, int]] = frozenset()

# Transformer-style sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5): frequencies span
# 1 … 1/MAX_PERIOD geometrically.
MAX_PERIOD = 10_000


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    t: [N].  Returns [N x dim] float32: [cos(t·ω_0) … cos(t·ω_{h−1}), sin(t·ω_0) … sin(t·ω_{h−1})],
    with h = dim // 2 and ω_i = max_period^(−i/h); a zero column pads an odd dim.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zeroes a layer's parameters, so a residual branch starts as the identity (as in DDPM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNormAct(nn.Module):
    """GroupNorm with optional FiLM modulation and SiLU: act(GN(x)·(1 + scale) + shift).

    The affine parameters are called weight and bias as in nn.GroupNorm, so checkpoints read naturally.
    """

    def __init__(self, num_groups: int, num_channels: int, silu: bool = True, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups; "
                             f"choose num_groups dividing every channel count")
        self.num_groups, self.num_channels, self.silu, self.eps = num_groups, num_channels, silu, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.fused = False

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        impl = kernels.group_norm_film_silu if self.fused else reference.group_norm_film_silu
        return impl(x, self.num_groups, self.weight, self.bias, scale, shift, self.eps, self.silu)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, silu={self.silu}, eps={self.eps}"


class EmbeddingBlock(nn.Module):
    """A block conditioned on the embedding: forward(x [N x C x H x W], emb [N x E]) → [N x C' x H' x W']."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward(x, emb)")


class EmbeddingSequential(nn.Sequential, EmbeddingBlock):
    """Layers run in order; those that are EmbeddingBlocks also receive the embedding.

    A subclass of nn.Sequential, so its children are named 0, 1, … exactly as in an nn.ModuleList and
    state_dict keys (e.g. ``down.3.1.qkv.weight``) are those of a list of layers.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, EmbeddingBlock) else layer(x)
        return x


class ResBlock(EmbeddingBlock):
    """GN → SiLU → conv, then GN modulated by FiLM from the embedding → SiLU → dropout → conv, + skip.

    x: [N x C_in x H x W], emb: [N x E]  →  [N x C_out x H x W].  The FiLM projection maps the embedding
    to a per-channel (scale, shift): h = GN(h)·(1 + scale) + shift (Perez et al. 2018; improved-diffusion's
    "scale-shift norm").  conv2 starts at zero, so each block starts as its skip path.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, num_groups: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNormAct(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.norm2 = GroupNormAct(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        scale, shift = self.emb_proj(emb).to(h.dtype).chunk(2, dim=1)  # (N, C_out) each
        h = self.norm2(h, scale, shift)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, with a residual connection.

    x: [N x C x H x W] → same shape.  Each head has d = C / heads channels.  proj_out starts at zero.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"attention: {channels} channels are not divisible into {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, channels // num_heads
        self.norm = GroupNormAct(num_groups, channels, silu=False)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, self.head_dim, height * width)  # (N, 3, nh, d, L)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # (N, nh, L, d) each, strided views
        out = self.attend(q, k, v)  # (N, nh, L, d)
        out = out.transpose(-1, -2).reshape(n, c, height, width)
        return x + self.proj_out(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ/√d) v for q, k, v [N x heads x L x d]: the eager reference, or with fused kernels
        the faster of the Triton kernel and SDPA at this (L, d) (TRITON_ATTENTION_FASTER)."""
        if not self.fused:
            return reference.attention(q, k, v)
        if (q.shape[-2], q.shape[-1]) in TRITON_ATTENTION_FASTER:
            return kernels.attention(q, k, v)  # (reads the strided views in place)
        # SDPA's flash and memory-efficient kernels need unit stride along d; the views from the qkv
        # projection have stride L there, and would send it to its slow math path
        return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())


class Downsample(nn.Module):
    """Halves H and W: a stride-2 3×3 conv (28 → 14 → 7; odd sizes round up), or with conv=False the
    2×2 average, which has no weights and costs almost nothing (improved-diffusion's conv_resample=False;
    even sizes only, which UNetConfig's divisibility check guarantees)."""

    def __init__(self, channels: int, conv: bool = True):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.conv is not None else nn.functional.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Doubles H and W (nearest neighbour), then a 3×3 conv unless conv=False."""

    def __init__(self, channels: int, conv: bool = True):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x
