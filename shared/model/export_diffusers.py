"""Export a trained U-Net and its schedule as a diffusers pipeline folder (DDPMPipeline layout).

    python stage2_unet/export.py runs/00003-mnist-mnist-bf16 exported/
    # then, with diffusers installed:  DDPMPipeline.from_pretrained("exported/")

The folder holds `model_index.json`, `unet/` (config.json and diffusion_pytorch_model.safetensors for
diffusers' UNet2DModel) and `scheduler/` (scheduler_config.json for DDPMScheduler). Writing it needs
only `safetensors`, not diffusers.

The network maps one to one onto UNet2DModel:

    ours                                  UNet2DModel
    sinusoid [cos, sin], ω_i = 10⁴^(−i/h)  time_proj: flip_sin_to_cos=True, freq_shift=0
    time_embed.0 / .2                     time_embedding.linear_1 / linear_2
    class_embed (num_classes + 1, null)   class_embedding (num_class_embeds = num_classes + 1)
    ResBlock with FiLM (1 + scale, shift) ResnetBlock2D, resnet_time_scale_shift="scale_shift"
    SelfAttention: GN, qkv 1×1, proj_out  Attention: group_norm, to_q/to_k/to_v, to_out.0
    Downsample (3×3 conv, stride 2)       downsamplers.0.conv (downsample_type="conv", padding 1)
    Upsample (nearest ×2, 3×3 conv)       upsamplers.0.conv (upsample_type="conv")
    without resampling convs:             the same convs with fixed weights that compute exactly
      2×2 average / nearest ×2 alone        the average (¼ at the 2×2 taps that stride 2 and padding 1
                                            align with it) or the identity (1 at the centre tap)
    out_norm (GN + SiLU), out_conv        conv_norm_out, conv_act, conv_out

The middle block's attention keeps its GroupNorm only when `attn_norm_num_groups` is given: with a
scale-shift time embedding, diffusers otherwise builds that attention without a norm.

The schedule goes over as `trained_betas` (our float64 β_t), exact for every T and both schedules, and
the network's prediction type (its `prediction` attribute, set from the checkpoint's record by the
loader; "eps" when absent) as diffusers' `prediction_type`: eps → "epsilon", v → "v_prediction",
x0 → "sample".
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from shared.errors import UserError
from shared.model.blocks import Downsample, ResBlock, SelfAttention, Upsample
from shared.model.unet import UNet

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# The diffusers release whose config format the files follow (0.2x and later read it).
DIFFUSERS_FORMAT_VERSION = "0.30.0"
# Our prediction types (shared.diffusion.prediction.PREDICTIONS) under diffusers' names.
DIFFUSERS_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def check_exportable(model: UNet) -> None:
    """UNet2DModel has one head width for all attention layers and a first level as wide as conv_in."""
    cfg = model.config
    if cfg["channel_mult"][0] != 1:
        raise UserError(f"cannot export to diffusers: channel_mult[0] is {cfg['channel_mult'][0]}, but "
                        f"UNet2DModel's first level has the width of its input conv (channel_mult[0] = 1)")
    head_dims = {m.head_dim for m in model.modules() if isinstance(m, SelfAttention)}
    if len(head_dims) > 1:
        raise UserError(f"cannot export to diffusers: attention head widths differ between levels "
                        f"({sorted(head_dims)}), and UNet2DModel has one attention_head_dim")


def unet2d_config(model: UNet) -> dict:
    """The UNet2DModel constructor arguments of an equivalent network."""
    check_exportable(model)
    cfg = model.config
    widths = [cfg["base_channels"] * m for m in cfg["channel_mult"]]
    attn_levels = [cfg["image_size"] // 2 ** i in cfg["attention_resolutions"] for i in range(len(widths))]
    head_dim = next(m.head_dim for m in model.modules() if isinstance(m, SelfAttention))
    return dict(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["in_channels"],
        center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
        mid_block_type="UNetMidBlock2D", block_out_channels=widths, layers_per_block=cfg["num_res_blocks"],
        mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv", upsample_type="conv",
        dropout=cfg["dropout"], act_fn="silu", attention_head_dim=head_dim, norm_num_groups=cfg["num_groups"],
        attn_norm_num_groups=cfg["num_groups"], norm_eps=1e-5, resnet_time_scale_shift="scale_shift",
        add_attention=True, class_embed_type=None,
        num_class_embeds=cfg["num_classes"] + 1 if cfg["num_classes"] > 0 else None)


def _resnet(prefix: str, block: ResBlock, out: dict) -> None:
    for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj.1", "time_emb_proj"),
                         ("norm2", "norm2"), ("conv2", "conv2"), ("skip", "conv_shortcut")):
        module = block.get_submodule(ours)
        for name, p in module.named_parameters():
            out[f"{prefix}.{theirs}.{name}"] = p.detach()


def _attention(prefix: str, block: SelfAttention, out: dict) -> None:
    c = block.qkv.in_channels
    out[f"{prefix}.group_norm.weight"] = block.norm.weight.detach()
    out[f"{prefix}.group_norm.bias"] = block.norm.bias.detach()
    w, b = block.qkv.weight.detach()[:, :, 0, 0], block.qkv.bias.detach()  # [3C x C], [3C]: q, k, v rows
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{prefix}.{name}.weight"] = w[i * c:(i + 1) * c]
        out[f"{prefix}.{name}.bias"] = b[i * c:(i + 1) * c]
    out[f"{prefix}.to_out.0.weight"] = block.proj_out.weight.detach()[:, :, 0, 0]
    out[f"{prefix}.to_out.0.bias"] = block.proj_out.bias.detach()


def _resample_conv(layer: Downsample | Upsample) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3×3 conv (weight [C x C x 3 x 3], bias [C]) diffusers' resampler runs in place of ours.

    A conv-free Downsample is the 2×2 average: output pixel i of a stride-2, padding-1 conv reads
    input rows 2i−1, 2i, 2i+1, so taps 1 and 2 of each axis are the 2×2 window; ¼ there, per channel.
    A conv-free Upsample is the identity after the doubling: 1 at the centre tap."""
    if layer.conv is not None:
        return layer.conv.weight.detach(), layer.conv.bias.detach()
    c = layer.channels
    weight = torch.zeros(c, c, 3, 3)
    taps = (slice(1, 3), slice(1, 3)) if isinstance(layer, Downsample) else (1, 1)
    weight[(range(c), range(c)) + taps] = 0.25 if isinstance(layer, Downsample) else 1.0
    return weight, torch.zeros(c)


def _level_block(prefix: str, layers, counters: dict, out: dict) -> None:
    """Maps one of our blocks (ResBlock [+ attention] [+ resampler]) into diffusers' block `prefix`."""
    for layer in layers:
        if isinstance(layer, ResBlock):
            _resnet(f"{prefix}.resnets.{counters['res']}", layer, out)
            counters["res"] += 1
        elif isinstance(layer, SelfAttention):
            _attention(f"{prefix}.attentions.{counters['res'] - 1}", layer, out)
        elif isinstance(layer, (Downsample, Upsample)):
            kind = "downsamplers" if isinstance(layer, Downsample) else "upsamplers"
            weight, bias = _resample_conv(layer)
            out[f"{prefix}.{kind}.0.conv.weight"] = weight
            out[f"{prefix}.{kind}.0.conv.bias"] = bias
        else:
            raise TypeError(f"no diffusers counterpart for {type(layer).__name__}")


def unet2d_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """Our weights under UNet2DModel's parameter names (contiguous fp32 copies)."""
    check_exportable(model)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in (("input_conv", "conv_in"), ("time_embed.0", "time_embedding.linear_1"),
                         ("time_embed.2", "time_embedding.linear_2"), ("out_norm", "conv_norm_out"),
                         ("out_conv", "conv_out")):
        for name, p in model.get_submodule(ours).named_parameters():
            out[f"{theirs}.{name}"] = p.detach()
    if model.class_embed is not None:
        out["class_embedding.weight"] = model.class_embed.weight.detach()
    levels, per_down = len(model.config["channel_mult"]), model.config["num_res_blocks"]
    down = iter(model.down)
    for level in range(levels):  # per level: num_res_blocks blocks, then a Downsample except at the bottom
        counters = {"res": 0}
        for _ in range(per_down + (level != levels - 1)):
            _level_block(f"down_blocks.{level}", next(down), counters, out)
    _level_block("mid_block", model.middle, {"res": 0}, out)
    up = iter(model.up)
    for level in range(levels):
        counters = {"res": 0}
        for _ in range(per_down + 1):
            _level_block(f"up_blocks.{level}", next(up), counters, out)
    return {k: v.float().contiguous().clone() for k, v in out.items()}


def scheduler_config(betas: torch.Tensor, prediction: str = "eps") -> dict:
    """DDPMScheduler arguments for our schedule: β_t given exactly, the network's prediction type
    (DIFFUSERS_PREDICTION_TYPES), x̂_0 clipped to [−1, 1], the posterior variance β̃_t (DDPM's σ_t² = β̃_t,
    "fixed_small")."""
    if prediction not in DIFFUSERS_PREDICTION_TYPES:
        raise UserError(f"cannot export a network that predicts {prediction!r}; diffusers knows "
                        f"{', '.join(DIFFUSERS_PREDICTION_TYPES)}")
    return dict(num_train_timesteps=int(betas.numel()), trained_betas=[float(b) for b in betas],
                beta_schedule="linear", prediction_type=DIFFUSERS_PREDICTION_TYPES[prediction], clip_sample=True,
                clip_sample_range=1.0, variance_type="fixed_small", timestep_spacing="leading")


def export_diffusers(model: UNet, betas: torch.Tensor, out_dir: str | os.PathLike) -> Path:
    """Writes the pipeline folder `out_dir` (which must not exist yet), whole or not at all."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("exporting to diffusers needs the safetensors package: pip install safetensors") from None
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; give a new folder for the export")
    if not out_dir.resolve().parent.is_dir():
        raise UserError(f"cannot write {out_dir}: the folder {out_dir.resolve().parent} does not exist")
    config, weights = unet2d_config(model), unet2d_state_dict(model)
    scheduler = scheduler_config(betas, getattr(model, "prediction", "eps"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.resolve().parent))
    try:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        header = {"_diffusers_version": DIFFUSERS_FORMAT_VERSION}
        _write_json(tmp / "unet" / "config.json", {"_class_name": "UNet2DModel", **header, **config})
        save_file(weights, str(tmp / "unet" / UNET_WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / "scheduler" / "scheduler_config.json",
                    {"_class_name": "DDPMScheduler", **header, **scheduler})
        _write_json(tmp / "model_index.json", {"_class_name": "DDPMPipeline", **header,
                                               "unet": ["diffusers", "UNet2DModel"],
                                               "scheduler": ["diffusers", "DDPMScheduler"]})
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
