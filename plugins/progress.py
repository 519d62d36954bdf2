"""A progress bar, as a plugin (``fit(verbose=1)`` activates it by name), drawn by Keras's ``Progbar``."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from corebus import hookimpl


class ProgressBar:
    """Keras's progress display: ``keras.utils.Progbar`` with an ETA, as ``model.fit`` shows it.

    - ``verbose=1`` on a terminal: a live bar per epoch with the ETA, the time per step and the
      running metrics, redrawn in place. Each redraw fits the terminal's width (the bar narrows
      and the metrics that do not fit are left out until the epoch's final line), so a narrow
      terminal does not wrap the line and leave stale copies behind.
    - not a terminal (a log file, a pipe, CI), or ``verbose=2``: no redraws and no escape codes,
      one plain line per epoch (Keras's ``verbose=2`` line). Keras's own ``Progbar`` counts
      every POSIX process as a live display; this plugin asks the stream.

    Cost: between redraws a step costs one clock read; the batch logs are read (the step's one
    batched host fetch) only at a redraw, at most every ``interval`` seconds. Messages go where
    Keras sends its own (stdout, or logging after ``keras.config.disable_interactive_logging()``).

    :param interval: least seconds between two redraws of the live bar.
    :param stream: where to draw (default: ``sys.stdout`` at the time of drawing).
    :param width: the bar's width in characters on a wide terminal.
    """

    runs_on = "chief"  # under tf.distribute: one writer, not one per worker

    def __init__(self, interval: float = 0.1, stream: TextIO | None = None, width: int = 30):
        self.interval = interval
        self.stream = stream
        self.width = width
        self._verbose = 1
        self._epochs = 0
        self._steps: int | None = None
        self._bar: Any = None
        self._live = False
        self._last_draw = 0.0
        self._seen = 0

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    @hookimpl
    def on_train_begin(self, trainer):
        self._verbose = int(trainer.params.get("verbose", 1) or 1)
        self._epochs = trainer.params.get("epochs", 0)
        self._steps = trainer.params.get("steps")

    @hookimpl
    def on_epoch_begin(self, epoch):
        import keras  # here, not at import: listing plugins must not import Keras

        isatty = getattr(self._out, "isatty", None)
        self._live = self._verbose == 1 and bool(isatty and isatty())
        # Every metric is a running mean already: shown as given, not averaged again.
        self._bar = keras.utils.Progbar(
            self._steps, width=self._bar_width(), verbose=1 if self._live else 2, interval=0.0, stateless_metrics=()
        )
        self._bar._dynamic_display = self._live  # Progbar's own test is true for any POSIX process
        self._last_draw = time.monotonic()
        self._seen = 0
        if self._epochs > 1:  # as Keras's ProgbarLogger
            self._print(f"Epoch {epoch + 1}/{self._epochs}")

    @hookimpl
    def on_train_batch_end(self, batch, logs):
        self._seen = batch + 1  # for an epoch of unknown length
        if not self._live:
            return
        now = time.monotonic()
        if now - self._last_draw < self.interval:
            return  # no log read, so no host sync, between redraws
        self._last_draw = now
        self._update(batch + 1, logs, finalize=False)

    @hookimpl
    def on_epoch_end(self, logs):
        if self._bar is None:
            return
        done = self._steps or max(self._seen, 1)
        self._bar.target = done  # known now, for an epoch of unknown length (a generator)
        self._update(done, logs, finalize=True)
        self._bar = None

    def _update(self, done: int, logs: Mapping[str, Any] | None, finalize: bool) -> None:
        values = _numbers(logs)
        if not finalize:
            values = self._fitting(values, done)
        with self._redirected():
            self._bar.update(done, values, finalize=finalize)

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self._out.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return 80

    def _bar_width(self) -> int:
        return max(5, min(self.width, self._columns() // 4))

    def _fitting(self, values: list[tuple[str, float]], done: int) -> list[tuple[str, float]]:
        """The values that fit one terminal line after the bar, the ETA and the step time.

        ``loss`` first, then the others in order while they fit; each value is counted at its
        widest form, so the same names fit at every redraw (Progbar keeps showing a name once shown).
        """
        target = self._steps or done
        # "123/456 " + bar + " 1:02:03" (ETA) + " 123ms/step" (Progbar's widest forms)
        used = 2 * len(str(target)) + 2 + self._bar.width + 8 + 11
        room = self._columns() - 1  # a line as wide as the terminal wraps on some terminals
        chosen = []
        for name, value in sorted(values, key=lambda item: item[0] != "loss"):
            width = len(f" - {name}: ") + len("-1.2345e-05")
            if used + width <= room:
                chosen.append((name, value))
                used += width
        return chosen

    @contextlib.contextmanager
    def _redirected(self) -> Iterator[None]:
        # Progbar prints to sys.stdout; a stream given to this plugin takes its place meanwhile.
        if self.stream is None:
            yield
            return
        with contextlib.redirect_stdout(self.stream):
            yield

    def _print(self, message: str) -> None:
        from keras.src.utils import io_utils

        with self._redirected():
            io_utils.print_msg(message)


def _numbers(logs: Mapping[str, Any] | None) -> list[tuple[str, float]]:
    values = []
    for key, value in dict(logs or {}).items():
        try:
            values.append((key, float(value)))
        except (TypeError, ValueError):  # a vector metric: Keras's bar shows scalars only
            continue
    return values
