"""The noise-prediction U-Net ε_θ(x_t, t[, y]) (Ho et al. 2020, Appendix B; Nichol & Dhariwal 2021).

Layout, for channel_mult = (1, 2, 2) on 28×28 input (the `mnist` preset):

    input conv 1→64 ─ [ResBlock×2] 28² ─ down ─ [ResBlock×2] 14² ─ down ─ [ResBlock×2 + attn] 7²
                                                                             │ middle: Res, attn, Res
    output conv 64→1 ─ [ResBlock×3] 28² ─ up ─ [ResBlock×3] 14² ─ up ─ [ResBlock×3 + attn] 7²

Every down-path activation is concatenated into the matching up-path block (skip connections).
The time embedding (sinusoid → MLP) plus an optional class embedding conditions each ResBlock by FiLM.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import kernels
from kernels.flash_attention import SUPPORTED_HEAD_DIMS
from shared.errors import UserError
from shared.model.blocks import (Downsample, EmbeddingSequential, GroupNormAct, ResBlock, SelfAttention, Upsample,
                                 timestep_embedding, zero_module)

# Each preset is a complete set of constructor arguments; `from_preset(name, **overrides)` edits one.
PRESETS: dict[str, dict] = {
    # For tests: forward and backward of a small batch on a CPU in a few milliseconds.
    "tiny": dict(in_channels=1, image_size=28, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(14,), num_heads=1, dropout=0.0, num_classes=0, num_groups=8,
                 conv_resample=True),
    # MNIST-family digits: 28 → 14 → 7, attention at 7×7 (L = 49, head dim 64).
    "mnist": dict(in_channels=1, image_size=28, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                  attention_resolutions=(7,), num_heads=2, dropout=0.1, num_classes=0, num_groups=32,
                  conv_resample=True),
    # 2 CPU cores, 10 minutes: 16/64/64 channels, one ResBlock per level, attention only at 7×7 and in the
    # middle (L = 49, cheap), resampling without convs (with them, at 32/64/64, the up-sampling conv into
    # 28×28 alone is 15 % of the forward); 0.89 M parameters, 196 MFLOP per forward (mnist: 6.9 M, 2,209).
    "cpu": dict(in_channels=1, image_size=28, base_channels=16, channel_mult=(1, 4, 4), num_res_blocks=1,
                attention_resolutions=(7,), num_heads=1, dropout=0.0, num_classes=0, num_groups=8,
                conv_resample=False),
    # DDPM's CIFAR-10 model (Ho et al. 2020, App. B): 128 channels, (1, 2, 2, 2), 2 blocks, attention at
    # 16×16, dropout 0.1. DDPM used one 256-wide head; 4 heads of 64 give the same parameters and fit
    # the fused attention kernel's head sizes.
    "cifar10": dict(in_channels=3, image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), num_heads=4, dropout=0.1, num_classes=0, num_groups=32,
                    conv_resample=True),
    # 64×64 RGB image folders (--dataset folder --image-size 64): 64/128/256/256 channels at 64 → 32 → 16 → 8,
    # attention at 16×16 and 8×8 (L = 256 and 64, 4 heads of 64); 27.7 M parameters, 18.0 GFLOP per forward
    # (cifar10: 35.7 M, 12.4 GFLOP at 32×32). The widths stay low at 64×64, where activations cost most.
    "64": dict(in_channels=3, image_size=64, base_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
               attention_resolutions=(16, 8), num_heads=4, dropout=0.1, num_classes=0, num_groups=32,
               conv_resample=True),
}


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's shape, checked on construction (a ValueError names the bad field).

    Fields:
        in_channels: image channels C (the output has the same).
        image_size: H = W of the input; must be divisible by 2^(len(channel_mult) − 1).
        base_channels: channels of the first level; level i has base_channels · channel_mult[i].
        channel_mult: per-level width multipliers; one resolution level each.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes (in pixels) whose levels get self-attention; the
            middle block always has it.
        num_heads: attention heads (each of width channels / num_heads).
        dropout: dropout probability inside ResBlocks.
        num_classes: 0 for an unconditional model; else labels 0 … num_classes−1 plus a learned null
            class (index num_classes) for classifier-free guidance.
        num_groups: GroupNorm groups; must divide every channel count.
        conv_resample: True: a learned 3×3 conv in each Downsample (stride 2) and after each Upsample's
            nearest-neighbour doubling; False: the 2×2 average down and nearest-neighbour up alone, no
            weights (improved-diffusion's conv_resample). The resampling convs at the finest levels
            are a U-Net's widest convs at its largest resolution.
    """

    in_channels: int = 1
    image_size: int = 28
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 2
    dropout: float = 0.1
    num_classes: int = 0
    num_groups: int = 32
    conv_resample: bool = True

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        self._check_sizes()
        self._check_widths()

    def _check_sizes(self) -> None:
        for name in ("in_channels", "image_size", "base_channels", "num_res_blocks", "num_heads", "num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of integers >= 1, got {self.channel_mult!r}")
        if not isinstance(self.conv_resample, bool):
            raise ValueError(f"conv_resample must be true or false, got {self.conv_resample!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mult) - 1} "
                             f"(one halving per level after the first)")

    def _check_widths(self) -> None:
        for mult in self.channel_mult:
            width = self.base_channels * mult
            if width % self.num_groups:
                raise ValueError(f"GroupNorm: {width} channels are not divisible into {self.num_groups} groups; "
                                 f"choose num_groups dividing every level's width")
            if width % self.num_heads:
                raise ValueError(f"attention: {width} channels are not divisible into {self.num_heads} heads")

    def to_dict(self) -> dict:
        """The plain dict a checkpoint stores (`UNetConfig(**d)` rebuilds it)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class UNet(nn.Module):
    """ε-prediction U-Net of the shape `config` gives (UNetConfig); `model.config` is its dict."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config.to_dict()
        in_channels, image_size, base_channels = config.in_channels, config.image_size, config.base_channels
        channel_mult, num_res_blocks = config.channel_mult, config.num_res_blocks
        attention_resolutions, num_heads, dropout = config.attention_resolutions, config.num_heads, config.dropout
        num_classes, num_groups = config.num_classes, config.num_groups
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.base_channels = base_channels
        emb_dim = 4 * base_channels  # DDPM's time-embedding width

        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, num_groups, dropout)

        def attn(c: int) -> SelfAttention:
            return SelfAttention(c, num_heads, num_groups)

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch, resolution = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, base_channels * mult)]
                ch = base_channels * mult
                if resolution in attention_resolutions:
                    layers.append(attn(ch))
                self.down.append(EmbeddingSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(EmbeddingSequential(Downsample(ch, config.conv_resample)))
                skip_channels.append(ch)
                resolution //= 2

        self.middle = EmbeddingSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for block in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), base_channels * mult)]
                ch = base_channels * mult
                if resolution in attention_resolutions:
                    layers.append(attn(ch))
                if level != 0 and block == num_res_blocks:
                    layers.append(Upsample(ch, config.conv_resample))
                    resolution *= 2
                self.up.append(EmbeddingSequential(*layers))

        self.out_norm = GroupNormAct(num_groups, ch)
        self.out_conv = zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))
        self.fused_kernels = False

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        """Builds a preset ('tiny', 'mnist', 'cifar10'), with any constructor argument overridden."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        config = dict(PRESETS[name])
        unknown = set(overrides) - set(config)
        if unknown:
            raise TypeError(f"unknown U-Net option(s): {', '.join(sorted(unknown))}")
        config.update(overrides)
        return cls(UNetConfig(**config))

    @property
    def null_class(self) -> int:
        """Label of the learned 'no class' embedding used for classifier-free guidance."""
        return self.num_classes

    def set_fused_kernels(self, enabled: bool = True) -> "UNet":
        """Switches every GroupNorm+FiLM+SiLU and attention spot to the fused kernels (or back to eager).

        Raises kernels.FusedKernelsUnavailable, with the reason, when the fused kernels cannot load.
        """
        if enabled:
            kernels.load("group_norm_film_silu")
            kernels.load("attention")
            head_dims = {m.head_dim for m in self.modules() if isinstance(m, SelfAttention)}
            if not head_dims <= set(SUPPORTED_HEAD_DIMS):
                raise kernels.FusedKernelsUnavailable(
                    f"the fused attention kernel supports head dims {SUPPORTED_HEAD_DIMS}; this model has "
                    f"{sorted(head_dims)} (channels / num_heads): change num_heads or run without fused kernels")
        for module in self.modules():
            if isinstance(module, (GroupNormAct, SelfAttention)):
                module.fused = bool(enabled)
        self.fused_kernels = bool(enabled)
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N x C x H x W] noisy images x_t; t: [N] integer timesteps (or one int); y: [N] labels in
        [0, num_classes] (num_classes = the null class; None means null).  Returns ε̂: [N x C x H x W]."""
        t, y = self._check_inputs(x, t, y)
        emb = self.time_embed(timestep_embedding(t, self.base_channels))
        if self.class_embed is not None:
            emb = emb + self.class_embed(y)

        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(self.out_norm(h))

    def _check_inputs(self, x, t, y):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape N x {self.in_channels} x H x W, got {tuple(x.shape)}")
        levels = len(self.config["channel_mult"])
        if x.shape[2] % 2 ** (levels - 1) or x.shape[3] % 2 ** (levels - 1):
            raise ValueError(f"H and W must be divisible by {2 ** (levels - 1)}, got {tuple(x.shape[2:])}")
        n = x.shape[0]
        if isinstance(t, int) or (torch.is_tensor(t) and t.ndim == 0):
            t = torch.full((n,), int(t), device=x.device, dtype=torch.long)
        if t.shape != (n,):
            raise ValueError(f"expected t of shape ({n},), got {tuple(t.shape)}")
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes=0) but labels were given")
            return t, None
        if y is None:
            y = torch.full((n,), self.null_class, device=x.device, dtype=torch.long)
        if y.shape != (n,):
            raise ValueError(f"expected labels of shape ({n},), got {tuple(y.shape)}")
        return t, y
