"""A picture of a U-Net drawn from the model itself: levels, resolutions, channels, attention and FiLM.

`unet_blocks` walks the module tree (input conv, the down path, the middle, the up path, the output
head) and records what each block does to resolution and width; `unet_levels` condenses that into one
row per resolution; `draw_unet` lays the blocks out as a U: the down path on the left, top to bottom,
the up path on the right, bottom to top, one band per resolution, with each skip connection drawn as a
bracket from the block that produces it to the block that concatenates it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from shared.model.blocks import Downsample, ResBlock, SelfAttention, Upsample  # noqa: E402
from shared.model.unet import UNet  # noqa: E402
from shared.records.plots import save_figure_atomically  # noqa: E402

COLOURS = {"conv": "#cfe8cf", "res": "#cfe0f5", "attn": "#f9d9b0", "resample": "#e4e4e4"}
BOX_W, BOX_H, BAND_H = 1.7, 0.8, 2.3  # data units: box size and the height of one resolution band


@dataclass(frozen=True)
class Block:
    """One top-level block of the U-Net as the diagram sees it.

    band: the resolution the block's skip tensor has (down path, input conv) or the resolution of the
    skip it concatenates (up path); for the other blocks their input resolution.
    """
    name: str                   # the module path, e.g. "down.3"
    path: str                   # "in", "down", "middle", "up" or "out"
    layers: tuple[str, ...]     # one label per layer, e.g. ("Res 192→128", "Attn 2×64")
    channels_in: int
    channels_out: int
    resolution_in: int
    resolution_out: int
    band: int
    attention: bool             # holds a SelfAttention
    film: int                   # ResBlocks inside (each modulated by the embedding through FiLM)


def _layer_label(layer, channels: int, resolution: int) -> tuple[str, int, int]:
    """(label, channels after, resolution after) of one layer inside a block."""
    if isinstance(layer, ResBlock):
        c_in, c_out = layer.conv1.in_channels, layer.conv1.out_channels
        return (f"Res {c_in}→{c_out}" if c_in != c_out else f"Res {c_out}"), c_out, resolution
    if isinstance(layer, SelfAttention):
        return f"Attn {layer.num_heads}×{layer.head_dim}", channels, resolution
    if isinstance(layer, Downsample):
        return ("Down conv s2" if layer.conv is not None else "Down avg 2×2"), channels, (resolution + 1) // 2
    if isinstance(layer, Upsample):
        return ("Up ×2 + conv" if layer.conv is not None else "Up ×2"), channels, resolution * 2
    raise TypeError(f"the diagram does not know the layer {type(layer).__name__}")


def _walk(name: str, path: str, block, channels: int, resolution: int) -> Block:
    labels, res_in, c_in = [], resolution, channels
    for layer in block:
        label, channels, resolution = _layer_label(layer, channels, resolution)
        labels.append(label)
    band = resolution if path == "down" else res_in
    return Block(name, path, tuple(labels), c_in, channels, res_in, resolution, band,
                 attention=any(isinstance(m, SelfAttention) for m in block),
                 film=sum(isinstance(m, ResBlock) for m in block))


def unet_blocks(model: UNet) -> list[Block]:
    """Every top-level block in execution order, with widths and resolutions read off its layers."""
    size, c0 = model.image_size, model.input_conv.out_channels
    blocks = [Block("input_conv", "in", (f"Conv {model.in_channels}→{c0}",), model.in_channels, c0,
                    size, size, size, attention=False, film=0)]
    channels, resolution, skips = c0, size, [c0]
    for i, block in enumerate(model.down):
        blocks.append(_walk(f"down.{i}", "down", block, channels, resolution))
        channels, resolution = blocks[-1].channels_out, blocks[-1].resolution_out
        skips.append(channels)
    blocks.append(_walk("middle", "middle", model.middle, channels, resolution))
    channels = blocks[-1].channels_out
    for i, block in enumerate(model.up):
        blocks.append(_walk(f"up.{i}", "up", block, channels + skips.pop(), resolution))
        channels, resolution = blocks[-1].channels_out, blocks[-1].resolution_out
    c_out = model.out_conv.out_channels
    blocks.append(Block("out", "out", ("GN+SiLU", f"Conv {channels}→{c_out}"), channels, c_out,
                        resolution, resolution, resolution, attention=False, film=0))
    return blocks


def unet_levels(model: UNet) -> list[dict]:
    """One row per resolution level, top to bottom: resolution, width of the down path's ResBlocks,
    ResBlocks per level on the way down and up, and whether the level has attention."""
    levels: dict[int, dict] = {}
    for b in unet_blocks(model):
        if b.path not in ("down", "up") or not b.film:
            continue
        level = levels.setdefault(b.band, dict(resolution=b.band, channels=None, down_blocks=0, up_blocks=0,
                                               attention=False))
        level[f"{b.path}_blocks"] += b.film
        level["attention"] |= b.attention
        if b.path == "down":
            level["channels"] = b.channels_out
    return sorted(levels.values(), key=lambda level: -level["resolution"])


def _positions(blocks: list[Block]) -> dict[str, tuple[float, float]]:
    """Box centres: bands top to bottom by resolution; down path from the left, up path to the right."""
    bands = sorted({b.band for b in blocks}, reverse=True)
    row = {res: i for i, res in enumerate(bands)}
    per_band: dict[tuple[str, int], list[Block]] = {}
    for b in blocks:
        side = "left" if b.path in ("in", "down") else "right" if b.path in ("up", "out") else "middle"
        per_band.setdefault((side, b.band), []).append(b)
    width = max(len(v) for (side, _), v in per_band.items() if side != "middle")
    gap = 1.0 if any(b.path == "middle" for b in blocks) else 0.0
    pos = {}
    for (side, band), items in per_band.items():
        for k, b in enumerate(items):
            x = {"left": k, "middle": width + k, "right": width + gap + k}[side] * (BOX_W + 0.6)
            pos[b.name] = (x, -row[band] * BAND_H)
    return pos


def _box(ax, b: Block, xy: tuple[float, float]) -> None:
    x, y = xy
    colour = (COLOURS["conv"] if b.path in ("in", "out") else COLOURS["attn"] if b.attention
              else COLOURS["res"] if b.film else COLOURS["resample"])
    ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H, boxstyle="round,pad=0.03",
                                facecolor=colour, edgecolor="#444444", linewidth=0.8))
    text = "\n".join(b.layers)
    ax.text(x, y, text, ha="center", va="center", fontsize=6.5 if len(b.layers) > 2 else 7.5)
    if b.film:  # one dot per FiLM-modulated ResBlock, on the box's top edge
        for k in range(b.film):
            ax.plot(x - BOX_W / 2 + 0.12 + 0.12 * k, y + BOX_H / 2, "o", color="#7a3db8", markersize=3.5,
                    zorder=5)


def _arrow(ax, start, end, **style) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=8, shrinkA=0, shrinkB=0,
                                 **{"color": "#333333", "linewidth": 0.9, **style}))


def _connect(ax, blocks: list[Block], pos) -> None:
    """Data flow between consecutive blocks, and each skip connection as a bracket above its band."""
    for a, b in zip(blocks, blocks[1:]):
        (xa, ya), (xb, yb) = pos[a.name], pos[b.name]
        if ya == yb:
            _arrow(ax, (xa + BOX_W / 2, ya), (xb - BOX_W / 2, yb))
            continue
        # Between bands, run through the free corridor just below the upper band's boxes, clear of the
        # lower band's skip brackets: down the left path, or up the right one.
        sign = 1 if yb > ya else -1
        corridor = max(ya, yb) - BOX_H / 2 - 0.35
        ax.plot([xa, xa, xb], [ya + sign * BOX_H / 2, corridor, corridor], color="#333333", linewidth=0.9)
        _arrow(ax, (xb, corridor), (xb, yb - sign * BOX_H / 2))
    producers = [b for b in blocks if b.path in ("in", "down")]
    consumers = [b for b in blocks if b.path == "up"]
    depth: dict[int, int] = {}
    for src, dst in zip(reversed(producers), consumers):  # the last skip made is the first one used
        level = depth[src.band] = depth.get(src.band, 0) + 1
        (xs, ys), (xd, yd) = pos[src.name], pos[dst.name]
        top = ys + BOX_H / 2 + 0.18 + 0.17 * level
        ax.plot([xs + 0.25, xs + 0.25, xd - 0.25], [ys + BOX_H / 2, top, top], color="#999999", linewidth=0.7,
                linestyle="--")
        _arrow(ax, (xd - 0.25, top), (xd - 0.25, yd + BOX_H / 2), color="#999999", linewidth=0.7,
               linestyle="--")


def draw_unet(model: UNet, path: str | os.PathLike, title: str | None = None):
    """Draws the model's U-Net into a PNG at `path` (written whole or not at all); returns the Figure
    (closed, for inspection: its texts name every level, block and layer)."""
    blocks = unet_blocks(model)
    pos = _positions(blocks)
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    fig, ax = plt.subplots(figsize=(1.05 * (max(xs) - min(xs) + 5), 1.0 * (max(ys) - min(ys) + 3.4)))
    for b in blocks:
        _box(ax, b, pos[b.name])
    _connect(ax, blocks, pos)
    left = min(xs) - BOX_W / 2 - 0.3
    for level in unet_levels(model):
        y = -sorted({b.band for b in blocks}, reverse=True).index(level["resolution"]) * BAND_H
        ax.text(left, y, f"{level['resolution']}×{level['resolution']}\n{level['channels']} ch",
                ha="right", va="center", fontsize=9, fontweight="bold")
    emb_dim = model.time_embed[-1].out_features
    cond = " + class embedding (null class for CFG)" if model.class_embed is not None else ""
    ax.text(min(xs) - BOX_W / 2, max(ys) + BOX_H / 2 + 1.1,
            f"t → sinusoid({model.base_channels}) → MLP → emb ({emb_dim}){cond};  "
            f"FiLM: every Res block (●) gets (scale, shift) = Linear(SiLU(emb))",
            ha="left", va="center", fontsize=8.5, color="#5b2a91")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=COLOURS[k], edgecolor="#444444") for k in
               ("res", "attn", "resample", "conv")]
    ax.legend(handles, ["Res blocks (FiLM)", "with self-attention", "down/up sampling", "input/output conv"],
              loc="lower left", fontsize=7.5, frameon=False, ncol=2)
    params = sum(p.numel() for p in model.parameters())
    ax.set_title(title or f"U-Net ε_θ(x_t, t): {params:,} parameters; dashed: skip connections (concatenated)",
                 fontsize=10)
    ax.set_xlim(left - 1.4, max(xs) + BOX_W / 2 + 0.3)
    ax.set_ylim(min(ys) - BOX_H / 2 - 1.2, max(ys) + BOX_H / 2 + 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    save_figure_atomically(fig, path, dpi=130)
    return fig
