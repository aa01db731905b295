"""Inpainting and class-conditional editing without retraining: RePaint (Lugmayr et al. 2022, "RePaint:
inpainting using denoising diffusion probabilistic models").

The mask: 1 (white) = fill, the pixels the model draws; 0 (black) = keep, the source image's pixels.
That is the convention of diffusers' inpainting pipelines (StableDiffusionInpaintPipeline: "white
pixels in the mask are repainted"); RePaint's m and diffusers' RePaintPipeline use the opposite (1 =
known). A class label (and guidance) decides what the filled region becomes: class-conditional editing.

On the descending timesteps t_0 > … > t_{S−1} a ddpm or ddim sampler visits (position p ↔ t_p, and
position S ↔ t = −1, the clean image), Algorithm 1 of the paper with its resampling (Sec. 4.2) is

    x ← N(0, I)                                                         (stream 0 of each sample's seed)
    for each move of `repaint_path` (j = jump_length, r = resamplings):
      down p → p + 1:
        x_fill = the sampler's step from t_p: DDPM Alg. 2 or DDIM Eq. 12     (RePaint Eq. 8b)
        x_keep = √ᾱ·x_source + √(1 − ᾱ)·z at t_{p+1} (`q_sample`; the source itself at p + 1 = S)  (Eq. 8a)
        x = x_fill where the mask is 1, x_keep where it is 0                                       (Eq. 8c)
      up p → p − j (resampling): x ← q(x_{t_{p−j}} | x_{t_p}) (`q_jump`: Eq. 1 applied j times, one draw)

`repaint_path` is RePaint's schedule in positions: going down, every position that lies a multiple of
j steps before the last (and at least j from the first) sends x back up j positions r − 1 times, so
the chain harmonises the filled region with the kept one before moving on. It is the list of diffusers'
RePaintScheduler.set_timesteps(S, j, r) read as positions (tests/test_inpainting.py checks that).
r = 1 is plain replacement (no resampling). The network runs once per down move: `repaint_nfe`.

The last move lands on p = S, where x_keep is the source itself, so the kept pixels of every result
are the source's, exactly. Noise: move k draws the sampler's z from stream 1 + 2k and the q_sample /
q_jump noise from stream 2 + 2k of each sample's seed, so image i does not depend on the batch.
"""
from __future__ import annotations

import dataclasses

import torch

from kernels.sampling_step.op import InKernelNoise
from shared.diffusion.forward import q_jump, q_sample
from shared.diffusion.guidance import guided_eps
from shared.diffusion.noise import X_T_STREAM, per_sample_noise
from shared.errors import UserError

__all__ = ["Inpainting", "INPAINT_SAMPLERS", "repaint_path", "repaint_moves", "repaint_nfe", "RePaint"]

# The samplers whose steps are stateless single steps t_p → t_{p+1}, which RePaint can interleave with
# its jumps back (DPM-Solver++'s multistep history and Heun's two stages cannot be rewound).
INPAINT_SAMPLERS = ("ddpm", "ddim")
# RePaint's defaults (Lugmayr et al. 2022, Sec. 4.2 and their released configs): j = 10, r = 10.
DEFAULT_JUMP_LENGTH = 10
DEFAULT_RESAMPLINGS = 10
MAX_RESAMPLINGS = 100


@dataclasses.dataclass(frozen=True, eq=False)
class Inpainting:
    """What to keep and what to fill, and how often to resample.

    source: [C x H x W] float in [−1, 1], the image whose kept pixels the result keeps.
    mask: [1 x H x W] or [C x H x W] bool, True (1, white) = fill, False (0, black) = keep.
    jump_length j and resamplings r of RePaint (module docstring)."""

    source: torch.Tensor
    mask: torch.Tensor
    jump_length: int = DEFAULT_JUMP_LENGTH
    resamplings: int = DEFAULT_RESAMPLINGS

    def check(self, shape_chw: tuple[int, int, int] | None = None) -> None:
        """UserError unless the fields are usable (and fit images of shape_chw, when given)."""
        for name, value, high in (("jump_length", self.jump_length, None),
                                  ("resamplings", self.resamplings, MAX_RESAMPLINGS)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high and value > high):
                raise UserError(f"inpainting {name} must be an integer in [1, {high or 'S'}], got {value!r}")
        source, mask = self.source, self.mask
        if not torch.is_tensor(source) or source.ndim != 3 or not source.is_floating_point():
            raise UserError("the inpainting source must be a float image [C x H x W]")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.ndim != 3 or mask.shape[0] not in (1, source.shape[0]):
            raise UserError(f"the inpainting mask must be a bool [1 x H x W] or [C x H x W], got "
                            f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
        if mask.shape[1:] != source.shape[1:]:
            raise UserError(f"the mask is {mask.shape[2]}×{mask.shape[1]} but the source is "
                            f"{source.shape[2]}×{source.shape[1]}")
        if shape_chw is not None and tuple(source.shape) != tuple(shape_chw):
            raise UserError(f"the inpainting source is {tuple(source.shape)} (C, H, W) but the model draws "
                            f"{tuple(shape_chw)}")
        if not bool(torch.isfinite(source).all()) or float(source.abs().max()) > 1.0:
            raise UserError("the inpainting source must hold finite values in [-1, 1]")


def repaint_path(num_steps: int, jump_length: int, resamplings: int) -> list[int]:
    """The positions x visits, from 0 (t_0, the noisiest) to num_steps (x0), one position per move:
    +1 a sampler step, −1 one step of the forward chain. RePaint's schedule (module docstring), as
    diffusers' RePaintScheduler.set_timesteps builds it, in positions p = S − 1 − (its t)."""
    S, j = num_steps, jump_length
    jumps = {t: resamplings - 1 for t in range(0, S - j, j)}  # in RePaint's count t = S − 1 − p
    t, ts = S, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(j):
                t += 1
                ts.append(t)
    return [S - 1 - t for t in ts] + [S]


def repaint_moves(path: list[int]) -> list[tuple[int, int]]:
    """(from, to) of each move of a path, consecutive steps back up merged into one jump."""
    moves: list[tuple[int, int]] = []
    for here, there in zip(path, path[1:]):
        if there < here and moves and moves[-1][1] < moves[-1][0]:
            moves[-1] = (moves[-1][0], there)
        else:
            moves.append((here, there))
    return moves


def repaint_nfe(num_steps: int, jump_length: int, resamplings: int) -> int:
    """Network evaluations of one RePaint chain: its down moves."""
    path = repaint_path(num_steps, jump_length, resamplings)
    return sum(1 for here, there in zip(path, path[1:]) if there > here)


class RePaint:
    """One batch through a RePaint chain (module docstring) with a ddpm / ddim `sampler`."""

    def __init__(self, model: torch.nn.Module, sampler, seeds: torch.Tensor, labels: torch.Tensor | None):
        """seeds: int64 [N] on the sampling device; labels: int64 [N] there, or None."""
        inpaint = sampler.opts.inpaint
        if inpaint is None or sampler.opts.sampler not in INPAINT_SAMPLERS:
            raise UserError(f"inpainting runs on the samplers {', '.join(INPAINT_SAMPLERS)}")
        self.model, self.sampler, self.seeds, self.labels = model, sampler, seeds, labels
        self.shape_chw = (model.in_channels, model.image_size, model.image_size)
        inpaint.check(self.shape_chw)
        self.source = inpaint.source.to(seeds.device, torch.float32)[None]  # [1 x C x H x W]
        self.fill = inpaint.mask.to(seeds.device)[None]                      # [1 x 1|C x H x W]
        self.moves = repaint_moves(repaint_path(len(sampler.timesteps), inpaint.jump_length, inpaint.resamplings))

    def _noise(self, stream: int) -> torch.Tensor:
        return per_sample_noise(self.seeds, self.shape_chw, self.seeds.device, torch.float32, stream)

    @staticmethod
    def streams(k: int) -> tuple[int, int]:
        """(the sampler's z stream, the q_sample / q_jump stream) of move k (module docstring)."""
        return 1 + 2 * k, 2 + 2 * k

    def _t(self, position: int) -> int:
        timesteps = self.sampler.timesteps
        return timesteps[position] if position < len(timesteps) else -1

    def down(self, p: int, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Move k, a sampler step p → p + 1 with the kept pixels from q(x_{t_{p+1}} | x_source): (x, x̂0)."""
        sampler, (z_stream, q_stream) = self.sampler, self.streams(k)
        eps, eps_uncond = guided_eps(self.model, sampler, p, x, self.labels)
        noise = None
        if sampler.noise_in_kernel:
            noise = InKernelNoise(self.seeds, z_stream)
        elif sampler.stochastic:
            noise = self._noise(z_stream)
        x_fill, x0_pred = sampler.step(p, x, eps, noise, eps_uncond)
        t_next, source = self._t(p + 1), self.source.expand_as(x_fill)
        x_keep = source if t_next < 0 else q_sample(sampler.schedule, source, t_next, self._noise(q_stream))
        return torch.where(self.fill, x_fill, x_keep), x0_pred

    def run(self, callback=None, bar=None) -> torch.Tensor:
        """The whole chain; returns the final float32 [N x C x H x W] (kept pixels equal to the source's)."""
        x = self._noise(X_T_STREAM)
        evaluation = 0
        for k, (here, there) in enumerate(self.moves):
            if there < here:  # resampling: back to the noisier position
                x = q_jump(self.sampler.schedule, x, self._t(here), self._t(there), self._noise(self.streams(k)[1]))
                continue
            x_next, x0_pred = self.down(here, x, k)
            if callback is not None:
                callback(evaluation, self._t(here), x, x0_pred)
            x, evaluation = x_next, evaluation + 1
            if bar is not None:
                bar.update(1)
        return x

