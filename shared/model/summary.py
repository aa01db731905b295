"""A per-block table of a U-Net: output shapes, parameter counts, and FLOPs per image."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from shared.model.unet import UNet


def block_table(model: UNet, x: torch.Tensor, t: torch.Tensor) -> list[dict]:
    """One row per top-level block, in execution order: name, output shape, own parameter count.

    x: [N x C x H x W]; t: [N].  Runs one forward pass with hooks on the blocks.
    """
    blocks: list[tuple[str, nn.Module]] = [("input_conv", model.input_conv)]
    blocks += [(f"down.{i}", m) for i, m in enumerate(model.down)]
    blocks += [("middle", model.middle)]
    blocks += [(f"up.{i}", m) for i, m in enumerate(model.up)]
    blocks += [("out_norm", model.out_norm), ("out_conv", model.out_conv)]
    rows: list[dict] = []

    def hook_for(name: str, module: nn.Module):
        kinds = "+".join(type(m).__name__ for m in module) if isinstance(module, nn.Sequential) else type(module).__name__

        def record(_module, _inputs, output):
            rows.append({"block": name, "layers": kinds, "output_shape": tuple(output.shape),
                         "params": sum(p.numel() for p in module.parameters())})
        return record

    handles = [module.register_forward_hook(hook_for(name, module)) for name, module in blocks]
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for h in handles:
            h.remove()
    embed = sum(p.numel() for p in model.time_embed.parameters())
    if model.class_embed is not None:
        embed += model.class_embed.weight.numel()
    rows.insert(0, {"block": "embeddings", "layers": "time MLP" + (" + class" if model.class_embed is not None else ""),
                    "output_shape": (x.shape[0], 4 * model.base_channels), "params": embed})
    return rows


def flops_per_image(model: UNet, x: torch.Tensor, t: torch.Tensor) -> int:
    """Forward FLOPs per image as counted by torch.utils.flop_counter (matmuls and convolutions, 2 per MAC)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t)
    return counter.get_total_flops() // x.shape[0]


def time_forward(model: UNet, x: torch.Tensor, t: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of one no-grad forward pass, after one warm-up pass."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            model(x, t)
            sync()
            if i:  # the first pass warms caches and allocators
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
