"""Numeric precision of the U-Net: one table of autocast dtypes for training and sampling.

Schedules stay float64 and the loss fp32 whatever is chosen here; only the network's matmuls and
convolutions run in the autocast dtype.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from shared.errors import UserError

# name → autocast dtype; fp32 means no autocast.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Training also takes "auto": bf16 where the device computes it natively, else fp32.
TRAIN_PRECISIONS = ("auto", *PRECISIONS)


def check_precision(precision: str, allowed=PRECISIONS) -> None:
    if precision not in allowed:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(allowed)}")


def autocast(device: torch.device | str, precision: str):
    """The autocast context for `precision` on `device` (a no-op context for fp32)."""
    check_precision(precision)
    device_type = torch.device(device).type
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=PRECISIONS[precision])
