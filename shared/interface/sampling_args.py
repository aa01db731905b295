"""What the sampling scripts (stage 4 and 5) share: their sampler flags and the SamplerOptions they
make, loading a checkpoint for them, the checks that run before any output exists, a timed sampling
call, and the source image and mask of inpainting (PNG files or bytes, checked before any work).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import kernels

from shared import flags
from shared.data.datasets import from_uint8
from shared.errors import UserError
from shared.diffusion.guidance import MAX_GUIDANCE
from shared.diffusion.inpainting import DEFAULT_JUMP_LENGTH, DEFAULT_RESAMPLINGS, MAX_RESAMPLINGS, Inpainting
from shared.diffusion.noise import MAX_SEED
from shared.diffusion.samplers import MAX_ETA, SAMPLERS, SamplerOptions, sample, sample_batches
from shared.diffusion.steps import SPACINGS, VARIANCES
from shared.model.precision import PRECISIONS
from shared.records.checkpoint import load_for_sampling
from shared.records.runs import make_run_dir

SAMPLER_HELP = ("ddpm: ancestral (Ho et al. Alg. 2); ddim: Song et al. Eq. 12; dpmpp: DPM-Solver++(2M); euler / heun: "
                "Karras et al. 2022 on Karras sigmas (heun: 2 network calls per step but the last, 2S - 1 NFE)")


def guidance_interval(text: str) -> tuple[float, float]:
    """'0.3,5' → (0.3, 5.0): the EDM noise levels (lo, hi] where guidance applies."""
    values = flags.float_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers LO,HI, got {text!r}")
    return values[0], values[1]



def add_sampler_args(parser: argparse.ArgumentParser, default_sampler: str = "ddim") -> None:
    g = parser.add_argument_group("sampler")
    g.add_argument("--checkpoint", required=True, help="a run directory (its ema.pt) or a checkpoint file")
    g.add_argument("--sampler", choices=SAMPLERS, default=default_sampler, help=SAMPLER_HELP)
    g.add_argument("--steps", type=flags.positive_int, default=None,
                   help="sampling steps S (euler/heun: noise levels); None means T for ddpm and 50 for the others")
    g.add_argument("--eta", type=flags.float_in(0.0, MAX_ETA), default=0.0, help="DDIM η (0: deterministic)")
    g.add_argument("--spacing", choices=SPACINGS, default="trailing", help="how S of the T timesteps are picked")
    g.add_argument("--variance", choices=VARIANCES, default="fixed_small", help="DDPM σ_t²: β̃_t or β_t")
    g.add_argument("--clip-x0", action="store_true", help="clip the predicted x̂0 to [-1, 1] at every step")
    g.add_argument("--guidance-scale", type=flags.float_in(0.0, MAX_GUIDANCE), default=1.0,
                   help="classifier-free guidance w: 0 unconditional, 1 conditional, >1 guided")
    g.add_argument("--guidance-rescale", type=flags.float_in(0.0, 1.0), default=0.0,
                   help="CFG rescale φ (Lin et al. 2024): mix φ of the guided output rescaled to the conditional "
                        "one's std; 0: off")
    g.add_argument("--guidance-interval", type=guidance_interval, default=None, metavar="LO,HI",
                   help="guide only at EDM noise levels σ = √((1−ᾱ)/ᾱ) in (LO, HI] (Kynkäänniemi et al. 2024), "
                        "the plain conditional model elsewhere; default: every step")
    g.add_argument("--batch-size", type=flags.positive_int, default=64, help="images per forward pass")
    g.add_argument("--seed", type=flags.int_in(0, MAX_SEED), default=0, help="seed of the first image; image i uses seed+i")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype of the U-Net")
    g.add_argument("--fused-kernels", action="store_true",
                   help="fused Triton U-Net ops and the fused C++/CUDA sampling step (fails if unavailable)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="capture the U-Net + step of one iteration as a CUDA graph and replay it (CUDA only; "
                        "with --fused-kernels the Triton U-Net ops are captured, the step is the graph's own)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def load_model(args: argparse.Namespace):
    """(model, schedule, meta, device) from --checkpoint/--device/--fused-kernels; errors are UserErrors."""
    device = flags.pick_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device, but this run uses {device}")
    model, schedule, meta = load_for_sampling(args.checkpoint, device)
    if args.fused_kernels:
        model.set_fused_kernels(True)  # raises FusedKernelsUnavailable (a UserError) with the reason
        kernels.load("ddpm_step"), kernels.load("ddim_step")  # the fused step too, before any output exists
    if args.steps is not None and args.steps > schedule.num_timesteps:
        raise UserError(f"--steps {args.steps} exceeds the model's T = {schedule.num_timesteps}")
    return model, schedule, meta, device


def sampler_options(args: argparse.Namespace, **changes) -> SamplerOptions:
    """The SamplerOptions the sampler flags ask for, with `changes` applied (a sweep's guidance_scale,
    a comparison's num_steps); checked by the sampler before anything runs."""
    opts = SamplerOptions(sampler=args.sampler, num_steps=args.steps, eta=args.eta, spacing=args.spacing,
                          clip_x0=args.clip_x0, guidance_scale=args.guidance_scale, variance=args.variance,
                          precision=args.precision, batch_size=args.batch_size, cuda_graphs=args.cuda_graphs,
                          guidance_rescale=args.guidance_rescale, guidance_interval=args.guidance_interval,
                          # a graph replays its own on-device step; the fused U-Net kernels are captured with it
                          fused_step=args.fused_kernels and not args.cuda_graphs)
    return dataclasses.replace(opts, **changes)


def check_seeds(first: int, n: int) -> list[int]:
    """Seeds first … first + n − 1, refused unless all fit the generator's [0, 2^63 − 1]."""
    if first + n - 1 > MAX_SEED:
        raise UserError(f"--seed {first} with {n} images runs past the largest seed 2^63 - 1")
    return [first + i for i in range(n)]


def check_finite(images: torch.Tensor) -> torch.Tensor:
    """images unchanged, or a UserError when any value is NaN or ±inf (a diverged model or step)."""
    bad = int((~torch.isfinite(images)).flatten(1).any(dim=1).sum())
    if bad:
        raise UserError(f"{bad} of {images.shape[0]} samples contain NaN or inf values (diverged or damaged "
                        "weights?); nothing was written")
    return images


@contextlib.contextmanager
def output_run_dir(out: str, name: str) -> Iterator[Path]:
    """A new numbered run folder under `out` for the outputs written inside the block.

    A failed write (a full disk, a permission change) removes the folder and becomes one UserError,
    so a run leaves either every output or nothing.
    """
    run_dir = make_run_dir(out, name)
    try:
        yield run_dir
    except BaseException as err:
        shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write the outputs to {str(run_dir)!r} ({err.strerror or err}); "
                            "nothing was kept") from None
        raise


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_sample(model, schedule, seeds: Sequence[int], opts: SamplerOptions, labels=None,
                 device: torch.device | None = None, progress: bool = True) -> tuple[torch.Tensor, float]:
    """sample(...) and its throughput in images/s (wall clock, synchronised on CUDA); non-finite
    samples are a UserError (`check_finite`)."""
    device = device if device is not None else next(model.parameters()).device
    _synchronize(device)
    start = time.perf_counter()
    images = sample(model, schedule, seeds, opts, labels, device, progress=progress)
    _synchronize(device)
    rate = len(seeds) / (time.perf_counter() - start)
    return check_finite(images), rate


def timed_batches(model, schedule, seeds: Sequence[int], opts: SamplerOptions, labels=None,
                  device: torch.device | None = None, callback=None,
                  progress: bool = True) -> Iterator[tuple[int, torch.Tensor, float]]:
    """sample_batches(...) with each batch's wall-clock seconds (synchronised on CUDA): yields
    (index of its first sample, its samples, seconds); non-finite samples are a UserError."""
    device = device if device is not None else next(model.parameters()).device
    batches = sample_batches(model, schedule, seeds, opts, labels, device, callback, progress)  # checks now
    while True:
        _synchronize(device)
        start = time.perf_counter()
        try:
            first, images = next(batches)
        except StopIteration:
            return
        _synchronize(device)
        yield first, check_finite(images), time.perf_counter() - start


def default_labels(model, n: int, label: int | None = None) -> torch.Tensor | None:
    """Round-robin labels 0, 1, … for a class-conditional model (or all `label`); None when unconditional."""
    if model.num_classes == 0:
        if label is not None:
            raise UserError("this checkpoint is unconditional: it takes no --label")
        return None
    if label is not None:
        if not 0 <= label < model.num_classes:
            raise UserError(f"--label must lie in [0, {model.num_classes - 1}], got {label}")
        return torch.full((n,), label, dtype=torch.long)
    return torch.arange(n) % model.num_classes


# --------------------------------------------------------------------------------------------------
# Inpainting inputs


def add_inpaint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("inpainting (RePaint, Lugmayr et al. 2022; ddpm or ddim)")
    g.add_argument("--inpaint", metavar="SOURCE.png", default=None,
                   help="keep this image's pixels where --mask is black and draw the rest (the model's size and "
                        "channels: 28×28 grey for MNIST)")
    g.add_argument("--mask", metavar="MASK.png", default=None,
                   help="the region to fill: white (255) = draw, black (0) = keep the source; no other values")
    g.add_argument("--jump-length", type=flags.positive_int, default=DEFAULT_JUMP_LENGTH,
                   help="RePaint's j: how many steps each resampling jumps back")
    g.add_argument("--resamplings", type=flags.int_in(1, MAX_RESAMPLINGS), default=DEFAULT_RESAMPLINGS,
                   help="RePaint's r: each jump point is passed r times (1: no resampling); the network runs about "
                        "r times as often")


def load_inpainting(args: argparse.Namespace, image_shape: Sequence[int]) -> Inpainting | None:
    """The Inpainting of --inpaint/--mask (None when neither is given), checked against the model's
    [C, H, W]; every problem is one UserError line."""
    if args.inpaint is None and args.mask is None:
        return None
    if args.inpaint is None or args.mask is None:
        raise UserError("inpainting needs both --inpaint SOURCE.png and --mask MASK.png")
    files = []
    for flag, path in (("--inpaint", args.inpaint), ("--mask", args.mask)):
        try:
            files.append(Path(path).read_bytes())
        except OSError as err:
            raise UserError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    return inpainting_from_png(files[0], files[1], image_shape, args.jump_length, args.resamplings,
                               (f"--inpaint {args.inpaint}", f"--mask {args.mask}"))


def inpainting_from_png(source: bytes, mask: bytes, image_shape: Sequence[int], jump_length: int = DEFAULT_JUMP_LENGTH,
                        resamplings: int = DEFAULT_RESAMPLINGS, names: tuple[str, str] = ("source", "mask")) -> Inpainting:
    """An Inpainting from the bytes of two image files (PNG or any format PIL reads): the source as the
    model's channels in [−1, 1], the mask as grey values that must all be 0 (keep) or 255 (fill).
    image_shape: the model's [C, H, W]; names: how messages call the two inputs."""
    channels, height, width = (int(v) for v in image_shape)
    pictures = []
    for name, data in zip(names, (source, mask)):
        try:
            picture = Image.open(io.BytesIO(data))
            picture.load()
        except (UnidentifiedImageError, OSError, ValueError):
            raise UserError(f"{name}: not an image file PIL can read") from None
        if picture.size != (width, height):
            raise UserError(f"{name}: the image is {picture.width}×{picture.height}, but the model draws "
                            f"{width}×{height} images")
        pictures.append(picture)
    pixels = np.asarray(pictures[0].convert("L" if channels == 1 else "RGB"), dtype=np.uint8).reshape(height, width, -1)
    grey = np.asarray(pictures[1].convert("L"), dtype=np.uint8)
    odd = np.setdiff1d(np.unique(grey), [0, 255])
    if odd.size:
        raise UserError(f"{names[1]}: the mask must be binary, 0 (keep) or 255 (fill), but it holds "
                        f"{odd.size} other grey value(s), e.g. {int(odd[0])}")
    inpaint = Inpainting(source=from_uint8(torch.from_numpy(pixels.copy()).permute(2, 0, 1)),
                         mask=torch.from_numpy(grey == 255)[None], jump_length=jump_length, resamplings=resamplings)
    inpaint.check((channels, height, width))
    return inpaint
