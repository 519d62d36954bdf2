"""Reduce the learning rate when a metric stops improving, like ``keras.callbacks.ReduceLROnPlateau``."""

from __future__ import annotations

from typing import Any

import numpy as np

from corebus import ConfigError, Monitor, hookimpl


class ReduceLROnPlateau:
    """``keras.callbacks.ReduceLROnPlateau``, composable with any learning-rate schedule.

    Same arguments and rule as Keras: after ``patience`` epochs in which ``monitor`` did not
    improve by more than ``min_delta``, the learning rate becomes ``max(lr * factor, min_lr)``
    (only while ``lr > min_lr``), then ``cooldown`` epochs pass before counting again. The
    epoch logs get ``learning_rate`` (the value before any reduction, as in Keras).

    The reduction is applied to ``trainer.lr.multiplier`` (effective LR = base or
    ``schedule(step)`` x multiplier), so it works next to a schedule, the case that crashes
    Keras (an optimizer built with a ``LearningRateSchedule`` refuses a new learning rate):

    - without a schedule the effective LR follows Keras's trajectory exactly;
    - with one, the multiplier is multiplied by ``factor``, and clamped so that the effective
      LR *at the step of the reduction* is not below ``min_lr``. The schedule may decay it
      further afterwards: ``min_lr`` bounds each reduction, not the schedule.

    :param monitor: metric name in the epoch logs (``val_*`` for validation metrics).
    :param factor: multiplier of the LR at each reduction, in ``[0, 1)``.
    :param patience: epochs with no improvement before a reduction.
    :param verbose: 1 prints a message at each reduction, as Keras does.
    :param mode: ``"auto"``, ``"min"`` or ``"max"``.
    :param min_delta: smallest change that counts as an improvement.
    :param cooldown: epochs to wait after a reduction before counting again.
    :param min_lr: lower bound of the learning rate.
    :param strict: raise :class:`corebus.ConfigError` when ``monitor`` is missing from the logs
        (Keras only warns; so does this plugin by default, once).

    Differences from Keras: bad values (``factor >= 1`` or negative, negative ``patience``,
    ``cooldown`` or ``min_lr``, unknown ``mode``) raise :class:`corebus.ConfigError` at
    construction (Keras raises for ``factor`` only, and falls back to ``auto`` for a bad mode);
    the direction of ``mode="auto"`` is decided at train begin, not at the first epoch end; it
    acts on the default optimizer's ``trainer.lr``. The state (:meth:`state_dict`) survives a
    resume: a restored instance does not reset its counters at the next train begin.
    """

    controls = {"lr.multiplier"}

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        strict: bool = False,
    ):
        if not 0.0 <= factor < 1.0:
            raise ConfigError(
                f"ReduceLROnPlateau: factor={factor!r} must be in [0, 1) (new_lr = lr * factor); "
                "Keras rejects factor >= 1.0 too"
            )
        for label, value in (("patience", patience), ("cooldown", cooldown)):
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ConfigError(f"ReduceLROnPlateau: {label}={value!r} must be a non-negative number of epochs")
        if min_lr < 0:
            raise ConfigError(f"ReduceLROnPlateau: min_lr={min_lr!r} must be >= 0")
        self._monitor = Monitor(monitor, mode, min_delta, owner="ReduceLROnPlateau", strict=strict)
        self.monitor, self.mode, self.min_delta = monitor, mode, self._monitor.min_delta
        self.factor = float(factor)
        self.patience = int(patience)
        self.verbose = verbose
        self.cooldown = int(cooldown)
        self.min_lr = float(min_lr)
        self.wait = 0
        self.cooldown_counter = 0
        self.best: float | None = None
        self.multiplier = 1.0
        self._restored = False

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    @hookimpl
    def on_train_begin(self, trainer):
        self._monitor.resolve(trainer.model)
        # Keras resets at every fit; a resumed run keeps the counters it was restored with.
        if not self._restored:
            self.best, self.wait, self.cooldown_counter = None, 0, 0
        self._restored = False
        self.multiplier = trainer.lr.multiplier

    @hookimpl
    def on_epoch_end(self, trainer, epoch, logs):
        logs["learning_rate"] = trainer.lr.value
        current = self._monitor.value(logs)
        if current is None:
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience and self._reduce(trainer, epoch):
                self.cooldown_counter = self.cooldown
                self.wait = 0

    def _is_improvement(self, current: float) -> bool:
        if self.best is None:
            return True
        # Keras compares with keras.ops on Python floats, i.e. in float32: 0.99990001 is not
        # below 1.0 there. Compare the same way so min_delta edge cases decide alike.
        m = self._monitor
        delta = -m.min_delta if m.minimize else m.min_delta
        return bool(m.op(np.float32(current - delta), np.float32(self.best)))

    def _reduce(self, trainer: Any, epoch: int) -> bool:
        lr = trainer.lr
        old = lr.value
        if not old > np.float32(self.min_lr):
            return False
        new = max(old * self.factor, self.min_lr)
        # Scaling the multiplier scales whatever produces the base LR (a constant or a
        # schedule); the min_lr clamp becomes the ratio that lands the current LR on min_lr.
        ratio = self.factor if new == old * self.factor else new / old
        lr.multiplier = lr.multiplier * ratio
        self.multiplier = lr.multiplier
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new}.")
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
            "best": self.best,
            "multiplier": self.multiplier,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.best = None if state["best"] is None else float(state["best"])
        self.multiplier = float(state["multiplier"])
        self._restored = True
