"""The one exception type for mistakes in what the user gave us (flags, paths, checkpoints, tensors).

Scripts catch it at the top (`shared.flags.run_main`) and print a single `error: ...` line instead of a
traceback; library callers can catch it like any other exception.

This module is also where the core first imports the `kernels` package, so it checks that the name resolves
to this project's folder: the package index has another package called `kernels` (Hugging Face's, which
diffusers may pull in), and when it comes first on sys.path every fused kernel would fail in a confusing way.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OUR_KERNELS = PROJECT_ROOT / "kernels" / "__init__.py"
KERNELS_MARKER = "__ddpm_from_scratch__"  # set in our kernels/__init__.py; another `kernels` lacks it


class UserError(Exception):
    """An error caused by user input, reported as one clear line."""


class ForeignKernelsPackage(ImportError):
    """`import kernels` resolves to another package of that name; the message names it and the fix."""


def _foreign_kernels_message(location: str) -> str:
    return (f"`import kernels` finds another package named kernels at {location}, not this project's "
            f"{OUR_KERNELS.parent} (Hugging Face's `kernels`, which diffusers may install, has the same name); "
            f"fix: `pip uninstall kernels`, or put {PROJECT_ROOT} first on PYTHONPATH")


# Where this project's programs live besides the stage*/ folders (scripts/, `python -m kernels.…`): a file
# elsewhere in the checkout, such as a virtual environment's pytest inside it, is not one of them.
PROGRAM_FOLDERS = ("scripts", "kernels", "benches")


def _started_from_this_project() -> bool:
    """True when the running program is one of this project's scripts or modules."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        return False
    path = Path(main_file).resolve()
    if PROJECT_ROOT not in path.parents:
        return False
    top = path.relative_to(PROJECT_ROOT).parts[0]
    return top.startswith("stage") or top in PROGRAM_FOLDERS


def _refuse_foreign_kernels(location: str):
    message = _foreign_kernels_message(location)
    if _started_from_this_project():
        # The scripts import the core at their top, before flags.run_main could catch anything: say it in
        # one line and exit as run_main does for a user error.
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ForeignKernelsPackage(message)


def _import_our_kernels():
    """Our `kernels` package; another package of that name is refused before its code runs (by the location
    importlib finds) or, if it was installed over ours, by the missing marker."""
    spec = importlib.util.find_spec("kernels")
    origin = getattr(spec, "origin", None)
    if spec is not None and (origin is None or Path(origin).resolve() != OUR_KERNELS):
        _refuse_foreign_kernels(origin or ", ".join(spec.submodule_search_locations or []) or "an unknown location")
    import kernels

    if getattr(kernels, KERNELS_MARKER, False) is not True:
        _refuse_foreign_kernels(getattr(kernels, "__file__", None) or "an unknown location")
    return kernels


def _user_errors() -> tuple[type[Exception], ...]:
    kernels = _import_our_kernels()  # kernels is a leaf package: it never imports shared
    return (UserError, kernels.FusedKernelsUnavailable)


# What the scripts and the server report as one line (a fused kernel that cannot run here is not a
# bug either: its message names what is missing).
USER_ERRORS = _user_errors()
