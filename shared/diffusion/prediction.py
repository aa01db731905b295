"""What the network predicts — ε, v or x0 — and the one conversion of its output to ε.

A network is trained to predict one of three targets from x_t = α_t·x0 + σ_t·ε, with α_t = √ᾱ_t and
σ_t = √(1 − ᾱ_t) (DDPM Eq. 4):

    prediction   target                       ε from the output o                    x̂0 from the output o
    "eps"        ε                            ε = o                                  (x_t − σ_t·o) / α_t
    "v"          v = α_t·ε − σ_t·x0           ε = σ_t·x_t + α_t·o                    α_t·x_t − σ_t·o
    "x0"         x0                           ε = (x_t − α_t·o) / σ_t                o

v is Salimans & Ho 2022 ("Progressive distillation for fast sampling of diffusion models", Sec. 4
and App. D): v ≡ α_t ε − σ_t x, with x̂ = α_t z_t − σ_t v̂ and ε̂ = σ_t z_t + α_t v̂ (their z_t is our
x_t). The x0 row is DDPM Eq. 4 solved for ε.

Every conversion to ε is affine, ε = p·o + q·x_t, with

    eps: (p, q) = (1, 0)      v: (α_t, σ_t)      x0: (−α_t/σ_t, 1/σ_t)

so the samplers turn the output into ε once, right after the model call and before any update
(`eps_from_output` on the scalars of `eps_coefficients`): the DDPM / DDIM / DPM-Solver++ / Euler /
Heun updates, the fused C++ step (which takes ε) and the CUDA-graph step (which reads p and q from a
device table) all see ε, and none of them knows the prediction type. Classifier-free guidance is
linear in o and the q·x_t term is common to ε_c and ε_u, so guiding before or after the conversion
gives the same ε̃.

The prediction type is a property of the trained network, recorded in its checkpoint (meta
"prediction"; a checkpoint from before the option is "eps"): `set_prediction(model, kind)` attaches
it when a network is built or loaded and `prediction_of(model)` reads it, looking through
DistributedDataParallel and torch.compile wrappers. A network without the attribute predicts ε.
"""
from __future__ import annotations

import math

import torch

from shared.errors import UserError

__all__ = ["PREDICTIONS", "check_prediction", "prediction_of", "set_prediction", "eps_coefficients",
           "eps_from_output", "training_target"]

PREDICTIONS = ("eps", "v", "x0")
# The attribute a network carries its prediction type in (absent: "eps").
PREDICTION_ATTRIBUTE = "prediction"
# Wrappers whose wrapped network holds the attribute: DistributedDataParallel / AveragedModel (.module),
# torch.compile (._orig_mod).
WRAPPED = ("module", "_orig_mod")


def check_prediction(prediction: str) -> str:
    """prediction unchanged if it is one of PREDICTIONS, else a UserError naming the choices."""
    if prediction not in PREDICTIONS:
        raise UserError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return prediction


def prediction_of(model: torch.nn.Module) -> str:
    """What `model`'s output is: its `prediction` attribute (see set_prediction), else "eps"."""
    seen = model
    while not hasattr(seen, PREDICTION_ATTRIBUTE):
        inner = next((getattr(seen, name) for name in WRAPPED if isinstance(getattr(seen, name, None),
                                                                            torch.nn.Module)), None)
        if inner is None:
            return "eps"
        seen = inner
    return check_prediction(getattr(seen, PREDICTION_ATTRIBUTE))


def set_prediction(model: torch.nn.Module, prediction: str) -> torch.nn.Module:
    """Records on `model` (in place; returned) that its output is `prediction` (one of PREDICTIONS)."""
    setattr(model, PREDICTION_ATTRIBUTE, check_prediction(prediction))
    return model


def eps_coefficients(prediction: str, alpha_bar: float) -> tuple[float, float] | None:
    """(p, q) of ε = p·o + q·x_t at a noise level ᾱ (module table), in float64; None for "eps" (ε = o).

    alpha_bar: ᾱ in (0, 1) of the model call (σ_t = 0 would make an x0 output's ε undefined)."""
    check_prediction(prediction)
    if prediction == "eps":
        return None
    if not 0.0 < alpha_bar < 1.0:
        raise ValueError(f"alpha_bar must lie in (0, 1) to convert a {prediction!r} output to ε, got {alpha_bar}")
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction == "v":
        return alpha, sigma           # ε = σ_t·x_t + α_t·v   (Salimans & Ho 2022, App. D)
    return -alpha / sigma, 1.0 / sigma  # ε = (x_t − α_t·x̂0) / σ_t   (DDPM Eq. 4)


def eps_from_output(output: torch.Tensor, x_t: torch.Tensor, coefficients) -> torch.Tensor:
    """ε = p·o + q·x_t for a network output o [N x C x H x W]; coefficients: (p, q) as floats or as tensors
    that broadcast against x_t (a CUDA graph's device table), or None (an ε-network: o itself)."""
    if coefficients is None:
        return output
    p, q = coefficients
    return p * output.to(x_t.dtype) + q * x_t


def training_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
                    sigma: torch.Tensor) -> torch.Tensor:
    """The regression target of a `prediction` network for x_t = α·x0 + σ·ε: ε, v = α·ε − σ·x0
    (Salimans & Ho 2022, Sec. 4) or x0. x0, noise: [N x C x H x W]; alpha, sigma: √ᾱ_t, √(1−ᾱ_t)
    broadcasting against them."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return alpha * noise - sigma * x0
