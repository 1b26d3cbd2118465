"""Graceful stop on SIGINT / SIGTERM for long commands, installed by the CLI, never by the engine.

The first SIGINT or SIGTERM only raises a flag: the training loop polls `StopSignals.requested`
once per step, writes a checkpoint and returns, and the CLI exits 128 + the signal number
(130 for SIGINT, 143 for SIGTERM). A second signal stops at once (KeyboardInterrupt), like a
second Ctrl-C should; the checkpoint being written then is left incomplete and is ignored.
Outside the main thread (where Python cannot install handlers) it does nothing. Decoding commands
raise `Stopped` from their progress callback once a stop is requested, after the batch in hand.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class Stopped(Exception):
    """Raised from a progress callback when a stop was requested: the work finished so far is kept."""


class StopSignals:
    """Context manager: `with StopSignals() as stop: train(..., should_stop=stop.requested)`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now
            self.signum = signum
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
