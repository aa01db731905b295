"""Stage 5: serve a checkpoint over HTTP (FastAPI under uvicorn); the model is loaded once.

    python stage5_guidance/serve.py --checkpoint C [--host 127.0.0.1] [--port 8000]
    curl -s localhost:8000/health
    curl -s -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "seven", "guidance_scale": 3, "sampler": "ddim", "steps": 50, "seed": 0, "n": 4}'

The response holds base64 PNGs, the resolved parameters and the timing; http://HOST:PORT/ is a web page
over the same API (shared/interface/server.py; its limits are in stage5_guidance/README.md). The
address is bound and, with --fused-kernels, one sampling step is run before serving: a port in use, an
unknown host or kernels that cannot run here stop it with one line. --port 0 picks a free port.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from shared import flags  # noqa: E402
from shared.errors import UserError  # noqa: E402
from shared.interface.sampling_args import add_sampler_args, load_model  # noqa: E402
from shared.interface.server import create_app, probe_fused  # noqa: E402
from shared.model.precision import PRECISIONS  # noqa: E402


def build_parser():
    parser = flags.make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run directory (its ema.pt) or a checkpoint file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=flags.int_in(0, 65535), default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype of the U-Net")
    parser.add_argument("--fused-kernels", action="store_true",
                        help="fused Triton U-Net ops and the fused sampling step (checked at start-up)")
    return parser


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line UserError (unknown host, port in use, no permission)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"--host {host!r} cannot be resolved ({getattr(err, 'strerror', None) or err})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    return sock


def sampler_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The stage 4/5 sampler flags at their defaults, with this server's checkpoint, device, precision and
    kernels: what sampling_args.load_model reads."""
    parser = argparse.ArgumentParser()
    add_sampler_args(parser)
    return parser.parse_args(["--checkpoint", args.checkpoint, "--device", args.device, "--precision", args.precision]
                             + (["--fused-kernels"] if args.fused_kernels else []))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve.py needs fastapi and uvicorn: pip install fastapi uvicorn") from None

    sock = bind(args.host, args.port)  # first: a port in use fails before the slow model load
    try:
        model, schedule, meta, device = load_model(sampler_flags(args))
        if args.fused_kernels:
            probe_fused(model, schedule, device, args.precision)
        app = create_app(model, schedule, meta, device, precision=args.precision, fused_step=args.fused_kernels)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    print(f"serving {meta.get('checkpoint')} on http://{host}:{port} ({device})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


if __name__ == "__main__":
    flags.run_main(main)
