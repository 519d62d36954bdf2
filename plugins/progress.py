"""A progress bar, as a plugin (``fit(verbose=1)`` activates it by name)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from corebus import hookimpl


class ProgressBar:
    """Keras-style progress: a live bar per epoch (``verbose=1``) or one line per epoch (``2``).

    The bar redraws at most every ``interval`` seconds, and only then reads the batch logs, so
    it costs one host sync per redraw, not one per step.
    """

    runs_on = "chief"  # under tf.distribute: one writer, not one per worker

    def __init__(self, interval: float = 0.1, stream: TextIO | None = None, width: int = 30):
        self.interval = interval
        self.stream = stream
        self.width = width
        self._verbose = 1
        self._epochs = 0
        self._steps: int | None = None
        self._epoch_start = 0.0
        self._last_draw = 0.0

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
        self._epoch_start = self._last_draw = time.monotonic()
        if self._verbose == 1:
            self._out.write(f"Epoch {epoch + 1}/{self._epochs}\n")

    @hookimpl
    def on_train_batch_end(self, batch, logs):
        if self._verbose != 1:
            return
        now = time.monotonic()
        if now - self._last_draw < self.interval:
            return
        self._last_draw = now
        self._draw(batch + 1, logs, now, final=False)

    @hookimpl
    def on_epoch_end(self, epoch, logs):
        now = time.monotonic()
        if self._verbose == 1:
            self._draw(self._steps or 0, logs, now, final=True)
        else:
            self._out.write(f"Epoch {epoch + 1}/{self._epochs} - {self._metrics(logs, now)}\n")
        self._out.flush()

    def _draw(self, done: int, logs: Any, now: float, final: bool) -> None:
        total = self._steps
        if total:
            filled = int(self.width * min(done, total) / total)
            arrow = ">" if filled < self.width else ""
            bar = f"{done}/{total} [{'=' * filled}{arrow}{'.' * (self.width - filled - len(arrow))}]"
        else:
            bar = f"{done}/?"
        end = "\n" if final else ""
        self._out.write(f"\r{bar} - {self._metrics(logs, now)}{end}")
        self._out.flush()

    def _metrics(self, logs: Any, now: float) -> str:
        elapsed = now - self._epoch_start
        parts = [f"{elapsed:.1f}s"]
        parts += [f"{key}: {value:.4f}" for key, value in dict(logs or {}).items()]
        return " - ".join(parts)
