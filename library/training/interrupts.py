"""Ctrl-C / SIGTERM during training: finish the current step, save, and stop cleanly."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Raised by the loop after it saved what it could on a stop request."""

    def __init__(self, step: int, state_folder: str | None):
        super().__init__(f"stopped at step {step}")
        self.step = step
        self.state_folder = state_folder


class StopRequest:
    """A flag set by SIGINT / SIGTERM; the loop checks it between steps."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: finishing the current step, then saving and stopping",
                       signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to this flag while training (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
