"""SIGINT and SIGTERM end a training run cleanly: the current step finishes, last.pt is written, one
line says so, and the process exits 128 + the signal number (130, 143), as a shell expects.

A second signal of the same kind while the first is being handled restores the default behaviour and
takes effect at once (an escape hatch when the checkpoint write itself hangs).
"""
from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM set `received` (the signal number) instead of
    killing the process. A no-op outside the main thread, where Python cannot install handlers."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: back to the default, now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
