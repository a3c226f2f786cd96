"""SIGINT and SIGTERM as a request to stop training at a step boundary, with a checkpoint."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("densenet_jax")


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop at the next point it looks (before
    another step starts, or once the one in flight is done and its metrics read), checkpointing
    the last completed step; a second one stops at once. Handlers can only be set from the main
    thread; elsewhere the signals keep their usual effect."""

    STOPPING = (signal.SIGINT, signal.SIGTERM)
    FIRST_STEP = "the first step, once compiled (compiling can take minutes)"

    def __init__(self):
        self.received: int | None = None
        self.waiting_for: str | None = None  # what the loop is in, said when a stop comes (None: a step)
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self.received, self._previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.STOPPING}
        return self

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        again = "Ctrl-C again" if signum == signal.SIGINT else f"{name} again"
        log.warning("%s: stopping after %s, with a checkpoint; %s stops now, without one", name,
                    self.waiting_for or "this step", again)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
