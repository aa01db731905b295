"""Command-line plumbing for every program of the project: typed flag values, the parser, the device
flag and the main() wrapper.

Every option is typed and range-checked at parse time, so a bad value fails with one line naming the
option and what is accepted, and `--help` shows each default.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

import torch

from shared.errors import USER_ERRORS, UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps the description's line breaks."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; a bad flag should cost the user one line."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(description: str) -> argparse.ArgumentParser:
    return OneLineErrorParser(description=description, formatter_class=HelpFormatter)


def _number(kind: type, lo: float | None, hi: float | None, what: str) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):  # NaN passes every comparison; inf and 1e309 are no number to train with
            raise argparse.ArgumentTypeError(f"expected {what} (finite), got {text!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse uses the name in its messages
    return parse


positive_int = _number(int, 1, None, "an integer >= 1")
nonneg_int = _number(int, 0, None, "an integer >= 0")
positive_float = _number(float, 1e-300, float("inf"), "a number > 0")
nonneg_float = _number(float, 0.0, float("inf"), "a number >= 0")


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    return _number(int, lo, hi, f"an integer in [{lo}, {hi}]")


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    return _number(float, lo, hi, f"a number in [{lo}, {hi}]")


def float_list(text: str) -> list[float]:
    """Parses '0,1,2.5' into [0.0, 1.0, 2.5]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """Parses '10,20,50' into [10, 20, 50] (each >= 1)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def pick_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an explicit 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    return device


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Runs a script's main(argv); a UserError (or a fused kernel that cannot run here) becomes one
    'error: ...' line on stderr and exit code 2."""
    try:
        main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
