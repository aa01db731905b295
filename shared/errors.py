"""The one exception type for mistakes in what the user gave us (flags, paths, checkpoints, tensors).

Scripts catch it at the top (`shared.cli.run_main`) and print a single `error: ...` line instead of a
traceback; library callers can catch it like any other exception.
"""


class UserError(Exception):
    """An error caused by user input, reported as one clear line."""
