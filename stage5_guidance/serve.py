"""Stage 5: serve a checkpoint over HTTP (FastAPI under uvicorn); the model is loaded once.

    python stage5_guidance/serve.py --checkpoint C [--host 127.0.0.1] [--port 8000]
    curl -s localhost:8000/health
    curl -s -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "seven", "guidance_scale": 3, "sampler": "ddim", "steps": 50, "seed": 0, "n": 4}'

The response holds base64 PNGs, the resolved parameters and the timing (shared/server.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from shared.interface import cli  # noqa: E402
from shared.errors import UserError  # noqa: E402
from shared.model.precision import PRECISIONS  # noqa: E402


def build_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run directory (its ema.pt) or a checkpoint file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=cli.int_in(0, 65535), default=8000, help="TCP port")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype of the U-Net")
    parser.add_argument("--fused-kernels", action="store_true",
                        help="fused Triton U-Net ops and the fused sampling step (fails if unavailable)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve.py needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    from shared.records.checkpoint import load_for_sampling
    from shared.interface.server import create_app

    device = cli.pick_device(args.device)
    model, schedule, meta = load_for_sampling(args.checkpoint, device)
    if args.fused_kernels:
        model.set_fused_kernels(True)
    app = create_app(model, schedule, meta, device, precision=args.precision, fused_step=args.fused_kernels)
    print(f"serving {meta.get('checkpoint')} on http://{args.host}:{args.port} ({device})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    cli.run_main(main)
