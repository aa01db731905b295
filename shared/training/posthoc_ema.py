"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models",
EDM2, Sec. 3 and App. C.3): an average of any decay rebuilt after training from the EMA snapshots
that --keep-snapshots K kept (ema-<step>.pt, shared.training.recorder).

Every stored EMA is a known linear combination of the raw weights θ_1 … θ_N of the training steps.
The EMA of shared.model.ema makes update n (n = 0, 1, …) with weight u_n = 1 − β_n on θ_{n+1}, β_0 = 0
(the first update copies) and β_n = min(β, (1 + n)/(w + n)) (decay β, warm-up w), so after s updates

    ê_s = Σ_{j=1..s} K_s(j) θ_j,   K_s(j) = u_{j−1} · Π_{m=j..s−1} β_m          (`ema_profile`)

A target average with profile T(j) over j = 1 … N (N the last snapshot's step) is rebuilt as EDM2 does:
the combination ê = Σ_k c_k ê_{s_k} whose profile Σ_k c_k K_{s_k} is closest to T in least squares over
the steps, here with Σ_k c_k = 1 so that ê stays an average (`reconstruction`). The targets
(`target_profile`):

    warmup None   the EMA of decay β' over the run with the start's bias removed (as Adam's bias
                  correction): T(j) = (1 − β') β'^{N−j} / (1 − β'^N)
    warmup w'     what --ema-decay β' --ema-warmup w' would have stored at step N: K_N for (β', w')

The approximation, precisely: EDM2 stores snapshots of power-function EMAs and solves this least-squares
problem with their closed-form inner products; we solve it on the exact discrete profiles of the EMAs the
run did store (exponential with the warm-up above, which behaves like a power function, β_n ≈ 1 − (w−1)/n,
while the warm-up lasts). The rebuilt weights are the target EMA exactly when T lies in the span of the
snapshot profiles; otherwise they differ from it by Σ_j r(j) θ_j with the residual profile
r = Σ_k c_k K_{s_k} − T. Two measures of it come with every result (`Reconstruction`): EDM2's objective
as ‖r‖₂/‖T‖₂ (`residual`), and the largest gap of the cumulative profiles, G = max_j |Σ_{i≤j} r(i)|
(`cdf_gap`). Since Σ_j r(j) = 0, summation by parts gives Σ_j r(j) θ_j = −Σ_{j<N} R(j)(θ_{j+1} − θ_j), so
the rebuilt weights are within G × (the length of the weights' path over training, Σ_j ‖θ_{j+1} − θ_j‖)
of the target EMA: a fit that is bumpy step by step (large ‖r‖₂) but right in its running sums is good
for weights that change slowly.
It also takes every step to have updated the EMA: a step skipped as non-finite does not advance the
EMA's counter, so each such step shifts the profiles by one. Buffers are averaged like weights (the EMA
does so too, use_buffers=True).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from shared.errors import UserError
from shared.model.ema import ema_decay_at
from shared.records.checkpoint import EMA_FORMAT, ema_file, load_checkpoint, with_defaults
from shared.training.recorder import SNAPSHOT_PREFIX, snapshot_step

POSTHOC_PREFIX = "ema-posthoc-"  # ema-posthoc-<decay>.pt: loads like ema.pt in sample.py / evaluate.py


def ema_profile(num_steps: int, decay: float, warmup: int) -> torch.Tensor:
    """K_s(j) for s = num_steps: float64 [s], the weight of θ_j (j = 1 … s) in the EMA after s updates."""
    profile = torch.zeros(num_steps, dtype=torch.float64)
    for n in range(num_steps):
        weight = 1.0 if n == 0 else 1.0 - ema_decay_at(n, decay, warmup)  # u_n
        profile.mul_(1.0 - weight)
        profile[n] += weight
    return profile


def target_profile(num_steps: int, decay: float, warmup: int | None) -> torch.Tensor:
    """T(j) over j = 1 … N (module docstring): the bias-corrected EMA of `decay` (warmup None), or the
    profile of the EMA with that decay and warm-up. float64 [N], summing to 1."""
    if not 0.0 < decay < 1.0:
        raise UserError(f"a post-hoc EMA decay must lie in (0, 1), got {decay}")
    if warmup is not None:
        return ema_profile(num_steps, decay, warmup)
    ages = torch.arange(num_steps - 1, -1, -1, dtype=torch.float64)  # N − j
    return (1.0 - decay) * decay ** ages / (1.0 - decay ** num_steps)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """c_k of each snapshot (in the order of `steps`), ‖r‖₂/‖T‖₂ and max_j |Σ_{i≤j} r(i)| (module docstring)."""
    steps: tuple[int, ...]
    coefficients: tuple[float, ...]
    residual: float
    cdf_gap: float


def reconstruction(steps: list[int], decay: float, warmup: int, target: torch.Tensor) -> Reconstruction:
    """The c minimising ‖Σ_k c_k K_{s_k} − T‖₂ with Σ_k c_k = 1, for snapshots at `steps` of an EMA with
    (decay, warmup) and a target profile [N], N = max(steps); solved in float64 through the KKT system
    [[PᵀP, 1], [1ᵀ, 0]]·[c; λ] = [PᵀT; 1] (least squares, for snapshots whose profiles are near-dependent)."""
    n = target.shape[0]
    if not steps or max(steps) != n or min(steps) < 1 or len(set(steps)) != len(steps):
        raise UserError(f"need distinct snapshot steps in [1, {n}] ending at {n}, got {steps}")
    profiles = torch.zeros(n, len(steps), dtype=torch.float64)  # P: column k is K_{s_k}, zero after s_k
    for k, step in enumerate(steps):
        profiles[:step, k] = ema_profile(step, decay, warmup)
    k = len(steps)
    system = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    system[:k, :k] = profiles.T @ profiles
    system[:k, k] = system[k, :k] = 1.0
    rhs = torch.cat([profiles.T @ target, torch.ones(1, dtype=torch.float64)])
    solution = torch.linalg.lstsq(system, rhs[:, None]).solution[:, 0]
    coefficients = solution[:k]
    r = profiles @ coefficients - target
    return Reconstruction(tuple(steps), tuple(float(c) for c in coefficients), float(r.norm() / target.norm()),
                          float(r.cumsum(0).abs().max()))


def combine(states: list[dict], coefficients) -> dict:
    """Σ_k c_k · state_k for every floating tensor (in float64, cast back); other tensors from the last."""
    if len(states) != len(coefficients) or not states:
        raise ValueError(f"{len(states)} states for {len(coefficients)} coefficients")
    out = {}
    for name, last in states[-1].items():
        if not last.is_floating_point():
            out[name] = last.clone()
            continue
        total = torch.zeros(last.shape, dtype=torch.float64)
        for state, c in zip(states, coefficients):
            total += float(c) * state[name].double()
        out[name] = total.to(last.dtype)
    return out


def snapshots(run_dir: str | Path) -> list[tuple[int, dict]]:
    """(step, checkpoint dict) of every ema-<step>.pt in a run directory, by step; UserError if there are
    none or they do not belong together (another network, another EMA decay or warm-up)."""
    run_dir = Path(run_dir)
    files = sorted((p for p in run_dir.glob(f"{SNAPSHOT_PREFIX}*.pt") if snapshot_step(p) is not None),
                   key=snapshot_step)
    if not files:
        raise UserError(f"no EMA snapshots (ema-<step>.pt) in {str(run_dir)!r}: train with --keep-snapshots K")
    loaded = [(snapshot_step(p), load_checkpoint(p)) for p in files]
    first = loaded[0][1]
    network = with_defaults(first["model_config"])
    for step, ckpt in loaded:
        if ckpt["format"] != EMA_FORMAT or with_defaults(ckpt["model_config"]) != network:
            raise UserError(f"{SNAPSHOT_PREFIX}{step:07d}.pt is not an EMA snapshot of the same network")
        if _ema_options(ckpt) != _ema_options(first):
            raise UserError(f"the snapshots were written with different EMA options: {_ema_options(ckpt)} vs "
                            f"{_ema_options(first)}")
    return loaded


def _ema_options(ckpt: dict) -> tuple[float, int]:
    options = ckpt["meta"].get("options") or {}
    try:
        return float(options["ema_decay"]), int(options["ema_warmup"])
    except (KeyError, TypeError, ValueError):
        raise UserError("an EMA snapshot lacks the run's ema_decay / ema_warmup options; it is damaged") from None


def posthoc_ema(loaded: list[tuple[int, dict]], decay: float, warmup: int | None = None) -> tuple[dict, Reconstruction]:
    """(the dict of an ema-posthoc file: ema.pt's format, rebuilt weights, meta with a "posthoc_ema"
    record; its Reconstruction) for a target EMA of `decay` (warmup: module docstring) from `snapshots`."""
    steps = [step for step, _ in loaded]
    run_decay, run_warmup = _ema_options(loaded[0][1])
    fit = reconstruction(steps, run_decay, run_warmup, target_profile(max(steps), decay, warmup))
    last = loaded[-1][1]
    state = combine([ckpt["state_dict"] for _, ckpt in loaded], fit.coefficients)
    record = {"decay": decay, "warmup": warmup, "snapshot_steps": list(steps), "coefficients": list(fit.coefficients),
              "residual": fit.residual, "cdf_gap": fit.cdf_gap,
              "method": "EDM2 least squares on the stored EMA profiles"}
    meta = {**last["meta"], "step": max(steps), "posthoc_ema": record}
    return ema_file(last["model_config"], state, last["schedule"], meta), fit


def posthoc_name(decay: float, warmup: int | None = None) -> str:
    """ema-posthoc-<decay>.pt (-w<warmup> for a warm-up target)."""
    return f"{POSTHOC_PREFIX}{decay:g}" + ("" if warmup is None else f"-w{warmup}") + ".pt"
