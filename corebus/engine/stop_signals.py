"""Graceful preemption: a scheduler's polite stop (SIGTERM, or an opt-in requeue signal such as
SLURM's SIGUSR1) ends a fit at the next step boundary instead of killing it mid-write.

The handler only records the signal (no I/O in a signal handler). The engine checks the record
after every train call (outside an accumulation window) and raises :class:`~corebus.Preempted`
there: ``on_exception`` then runs with it, so the backup plugin commits a snapshot of that step
and the loggers close with a status that says the run was stopped. The exit code is
``128 + signal``. A second signal while that shutdown runs raises at once; a shutdown that
outlasts ``timeout`` seconds ends the process with the same code.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from corebus.errors import ConfigError, Preempted


def signal_numbers(names: Any) -> tuple[int, ...]:
    """``("SIGTERM", "SIGUSR1")`` or numbers -> signal numbers (one clear error for a bad name)."""
    if names is None:
        return ()
    if isinstance(names, (str, int)):
        names = (names,)
    numbers = []
    for name in names:
        try:
            numbers.append(int(signal.Signals[name] if isinstance(name, str) else signal.Signals(name)))
        except (KeyError, ValueError):
            raise ConfigError(
                f"stop_signals: {name!r} is not a signal of this platform "
                "(use names such as 'SIGTERM', 'SIGUSR1', or () for none)"
            ) from None
    return tuple(numbers)


class StopSignals:
    """The signal handlers of one fit (installed only on the main thread, as Python allows)."""

    def __init__(self, signals: tuple[int, ...], timeout: float):
        self.signals = signals
        self.timeout = timeout
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop waiting for the shutdown
            raise Preempted(signum)
        self.received = signum

    def stop(self) -> Preempted:
        """The exception that ends the fit now; the shutdown after it has ``timeout`` seconds."""
        code = 128 + int(self.received or signal.SIGTERM)
        self._timer = threading.Timer(self.timeout, os._exit, args=(code,))
        self._timer.daemon = True
        self._timer.start()
        return Preempted(int(self.received or signal.SIGTERM))


__all__ = ["StopSignals", "signal_numbers"]
