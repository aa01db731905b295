"""Stage 3, one picture of a training run: the loss curve beside the EMA sample grids drawn along the way.

    python stage3_train/run_figure.py runs/00003-mnist-tiny-fp32 run.png [--grids 4]
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from shared.errors import UserError  # noqa: E402
from shared.flags import int_in, make_parser, run_main  # noqa: E402
from shared.records.run_figure import run_figure  # noqa: E402


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("run_dir", help="a run directory written by stage3_train/train.py")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--grids", type=int_in(1, 12), default=4, help="sample grids to show")
    parser.add_argument("--title", help="a title above the figure")
    args = parser.parse_args(argv)
    if not args.out.lower().endswith(".png"):
        raise UserError(f"{args.out}: the figure is a PNG; give a path ending in .png")
    run_figure(args.run_dir, args.out, args.grids, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
