"""Stop training when a monitored metric stops improving, like ``keras.callbacks.EarlyStopping``."""

from __future__ import annotations

from typing import Any

import numpy as np

from corebus import Monitor, hookimpl
from corebus.kit import check_number


class EarlyStopping:
    """``keras.callbacks.EarlyStopping`` as a corebus plugin: same arguments, same decisions.

    At every epoch end, once ``epoch >= start_from_epoch``: ``wait`` grows by one; an
    improvement on the best value (by more than ``min_delta``) records it as ``best`` /
    ``best_epoch`` and resets ``wait`` only if it also beats ``baseline``; otherwise, when
    ``wait >= patience`` (and ``epoch > 0``), training stops and ``stopped_epoch`` is set.

    ``restore_best_weights=True`` keeps the weights of the best epoch (or of the first
    monitored epoch if none improved) and, as in Keras 3, restores them at the end of training
    **whether or not training stopped early**.

    Differences from Keras: an unknown ``mode`` or a negative ``patience`` raises
    :class:`corebus.ConfigError` (Keras warns and falls back). A ``monitor`` the epoch logs do
    not have is a ``ConfigError`` at the first epoch end, naming the available keys and the close
    match (``val_acc`` -> ``val_accuracy``), where Keras warns and never stops: the one exception
    is a ``val_*`` monitor in an epoch without validation (``validation_freq``), which is skipped
    (inside ``model.fit``, where the adapter cannot know whether validation will run, with one
    warning); ``strict=True`` raises then too. A vector-valued monitor (``F1Score(average=None)``)
    is a ``ConfigError`` at the first epoch end; Keras's EarlyStopping fails on it at the second
    with a bare "truth value of an array is ambiguous". The state
    (:meth:`state_dict`) is JSON-serialisable, best weights included (nested lists plus dtypes),
    so a resumed run stops at the same epoch and restores the same weights.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        strict: bool = False,
    ):
        check_number("EarlyStopping", "patience", patience, at_least=0, integer=True, unit="epochs")
        self._monitor = Monitor(monitor, mode, min_delta, owner="EarlyStopping", strict=strict)
        self.monitor = monitor
        self.mode = mode
        self.min_delta = self._monitor.min_delta
        self.patience = int(patience)
        self.verbose = verbose
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.strict = strict
        self._reset()
        self._resumed = False

    def _reset(self) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best: float | None = None
        self.best_weights: list[np.ndarray] | None = None
        self.best_epoch = 0

    @hookimpl
    def on_train_begin(self):
        # Keras resets here so an instance can be reused across fits; a state loaded for a
        # resume must survive this one call.
        if not self._resumed:
            self._reset()
        self._resumed = False

    @hookimpl
    def on_epoch_end(self, trainer, epoch, logs):
        current = self._monitor.current(logs, trainer)
        if current is None or epoch < self.start_from_epoch:
            return
        # Resolved lazily, as in Keras (the model's metrics are built only after a step), and
        # after the name check: a misspelt name must not read as an unknown direction.
        self._monitor.resolve(trainer.model)
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = trainer.model.get_weights()
            self.best_epoch = epoch

        self.wait += 1
        if self._monitor.is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = trainer.model.get_weights()
            # Only restart the wait if both the baseline and the previous best are beaten.
            if self.baseline is None or self._monitor.is_improvement(current, self.baseline):
                self.wait = 0
            return

        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            trainer.stop_training = True

    @hookimpl
    def on_train_end(self, trainer):
        if self.stopped_epoch > 0 and self.verbose > 0:
            _print_msg(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                _print_msg(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            trainer.model.set_weights(self.best_weights)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Counters, best value and (if kept) best weights as nested lists: JSON-serialisable."""
        state: dict[str, Any] = {
            "wait": self.wait,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
        }
        if self.restore_best_weights:
            weights = self.best_weights
            state["best_weights"] = None if weights is None else [w.tolist() for w in weights]
            state["best_weights_dtypes"] = None if weights is None else [str(w.dtype) for w in weights]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = int(state["wait"])
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.stopped_epoch = int(state["stopped_epoch"])
        weights = state.get("best_weights")
        if weights is not None:
            dtypes = state["best_weights_dtypes"]
            self.best_weights = [np.asarray(w, dtype=d) for w, d in zip(weights, dtypes)]
        else:
            self.best_weights = None
        self._resumed = True


def _print_msg(message: str) -> None:
    # Where Keras's callbacks send their messages: stdout, or absl logging after
    # keras.config.disable_interactive_logging(). Imported late: Keras is heavy to import.
    from keras.src.utils import io_utils

    io_utils.print_msg(message)
