"""``best_metric``: keep the best value of a monitored metric in a JSON file while training runs.

A dashboard, a sweep driver or a CI job reads one small file instead of parsing logs::

    {"monitor": "val_loss", "mode": "min", "best": 0.1234, "epoch": 7, "step": 184, "epochs_seen": 9,
     "finished": false}

``epoch`` is 1-based, as Keras prints it; ``step`` is the global optimizer step of that epoch's
end. The file is rewritten atomically (temp file, fsync, rename) at every improvement and at the
end of training, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import corebus
from corebus import hookimpl
from corebus.kit import atomic_path, check_writable

__version__ = "0.1.0"


class BestMetric:
    """Track the best ``monitor`` value seen at epoch ends and write it to ``path``.

    :param monitor: an epoch-log key (``val_loss``, ``val_accuracy``, ``loss``...).
    :param mode: ``"min"`` or ``"max"``; ``"auto"`` is ``"max"`` for names containing
        ``acc`` or ``auc``, else ``"min"``.
    :param path: the JSON file to write (its directory is created).
    """

    runs_on = "chief"  # under tf.distribute: one writer, on the chief worker
    error_policy = "warn"  # a failed write is logged; training goes on

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", path: str | os.PathLike = "best_metric.json"):
        if mode == "auto":
            mode = "max" if any(s in monitor for s in ("acc", "auc")) else "min"
        if mode not in ("min", "max"):
            raise corebus.ConfigError(f"BestMetric: mode={mode!r}; use 'min', 'max' or 'auto'")
        self.monitor, self.mode, self.path = monitor, mode, Path(path)
        check_writable(self.path.parent, "BestMetric")  # fail before training, not at epoch 1
        self._reset()
        self._resumed = False

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None  # 0-based, like the hooks' `epoch`
        self.best_step: int | None = None
        self.epochs_seen = 0

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return self.best is None or (value < self.best if self.mode == "min" else value > self.best)

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def on_train_begin(self):
        if not self._resumed:  # a fresh fit starts over; a resumed one keeps its best
            self._reset()
        self._resumed = False

    @hookimpl
    def on_epoch_end(self, trainer, epoch, logs):
        self.epochs_seen += 1
        value = logs.get(self.monitor)
        if value is None or not self._better(float(value)):
            return
        self.best, self.best_epoch, self.best_step = float(value), epoch, trainer.global_step
        self._write(finished=False)

    @hookimpl
    def on_train_end(self):
        self._write(finished=True)

    # ---------------------------------------------------------------- file and state

    def summary(self, finished: bool = False) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "epoch": None if self.best_epoch is None else self.best_epoch + 1,
            "step": self.best_step,
            "epochs_seen": self.epochs_seen,
            "finished": finished,
        }

    def _write(self, finished: bool) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.summary(finished), indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """Saved with every run snapshot (``backup`` plugin), restored on resume."""
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "epochs_seen": self.epochs_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_step, self.epochs_seen = state["best_step"], state["epochs_seen"]
        self._resumed = True

    def __repr__(self) -> str:
        return f"BestMetric(monitor={self.monitor!r}, mode={self.mode!r}, path={str(self.path)!r})"
