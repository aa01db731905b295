"""The one exception type for mistakes in what the user gave us (flags, paths, checkpoints, tensors).

Scripts catch it at the top (`shared.interface.cli.run_main`) and print a single `error: ...` line instead of a
traceback; library callers can catch it like any other exception.
"""


class UserError(Exception):
    """An error caused by user input, reported as one clear line."""


def _user_errors() -> tuple[type[Exception], ...]:
    from kernels import FusedKernelsUnavailable  # kernels is a leaf package: it never imports shared

    return (UserError, FusedKernelsUnavailable)


# What the scripts and the server report as one line (a fused kernel that cannot run here is not a
# bug either: its message names what is missing).
USER_ERRORS = _user_errors()
