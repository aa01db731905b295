"""Stage 2: the noise-prediction U-Net ε_θ(x_t, t). Print its blocks, parameters and FLOPs; time it.

    python stage2_unet/unet.py --preset mnist
    python stage2_unet/unet.py --preset mnist --diagram unet.png   # also draw the network into a PNG
"""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from shared import UNet, UserError
from shared.flags import int_in, make_parser, pick_device, run_main
from shared.records.diagram import draw_unet
from shared.model.summary import block_table, flops_per_image, time_forward
from shared.model.unet import PRESETS


def parse_args(argv):
    parser = make_parser(__doc__)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="mnist", help="model configuration")
    parser.add_argument("--batch-size", type=int_in(1, 4096), default=8, help="batch for the forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--diagram", metavar="PATH", help="also draw the U-Net (levels, channels, attention, "
                        "FiLM, skips) into this PNG file")
    args = parser.parse_args(argv)
    if args.diagram is not None:
        check_png_path(args.diagram)
    return args


def check_png_path(path: str) -> None:
    """A diagram path must name a .png file in an existing folder (the file is replaced whole)."""
    if not path.lower().endswith(".png"):
        raise UserError(f"--diagram {path}: the diagram is a PNG; give a path ending in .png")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"--diagram {path}: cannot write there (the folder {folder} must exist and be writable)")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model = UNet.from_preset(args.preset).to(device).eval()
    c, size = model.in_channels, model.image_size
    x = torch.randn(args.batch_size, c, size, size, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)

    rows = block_table(model, x, t)
    print(f"U-Net preset {args.preset!r}: input {tuple(x.shape)}")
    print(f"{'block':<11} {'layers':<40} {'output shape':<20} {'params':>12}")
    for row in rows:
        print(f"{row['block']:<11} {row['layers']:<40} {str(row['output_shape']):<20} {row['params']:>12,}")
    total = sum(p.numel() for p in model.parameters())
    assert sum(r["params"] for r in rows) == total, "the table must account for every parameter"
    print(f"{'total':<73} {total:>12,}")

    if args.diagram is not None:
        draw_unet(model, args.diagram, f"U-Net preset '{args.preset}': {total:,} parameters; "
                                       f"dashed: skip connections (concatenated)")
        print(f"wrote the diagram to {args.diagram}")

    out = model(x, t)
    if out.shape != x.shape:
        raise RuntimeError(f"output shape {tuple(out.shape)} != input shape {tuple(x.shape)}")
    print(f"output shape = input shape: {tuple(out.shape)}")
    print(f"forward FLOPs per image: {flops_per_image(model, x, t) / 1e9:.3f} GFLOP")
    seconds = time_forward(model, x, t)
    print(f"forward pass, batch {args.batch_size} on {device}: {seconds * 1e3:.1f} ms "
          f"({args.batch_size / seconds:,.0f} images/s)")


if __name__ == "__main__":
    run_main(main)
