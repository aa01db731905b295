"""Stage 2, export: a trained U-Net and its schedule as a diffusers pipeline folder (DDPMPipeline layout).

    python stage2_unet/export.py runs/00003-mnist-mnist-bf16 exported/
    # then, with diffusers installed:  DDPMPipeline.from_pretrained("exported/")

The mapping onto diffusers' UNet2DModel is in shared/model/export_diffusers.py.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from shared.flags import make_parser, run_main  # noqa: E402
from shared.model.export_diffusers import export_diffusers  # noqa: E402
from shared.records.checkpoint import load_for_sampling  # noqa: E402


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("checkpoint", help="a run directory or a checkpoint file (ema.pt, last.pt, best.pt)")
    parser.add_argument("out", help="the pipeline folder to create (must not exist)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="the EMA weights (for sampling) or the raw trained ones")
    args = parser.parse_args(argv)
    model, schedule, _ = load_for_sampling(args.checkpoint, which=args.weights)
    export_diffusers(model, schedule.betas, args.out)
    print(f"wrote {args.out}: model_index.json, unet/ (UNet2DModel), scheduler/ (DDPMScheduler)")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
