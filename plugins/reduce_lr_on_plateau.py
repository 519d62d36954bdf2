"""Reduce the learning rate when a metric stops improving, like ``keras.callbacks.ReduceLROnPlateau``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from corebus import ConfigError, Monitor, hookimpl
from corebus.kit import check_number, optimizer_names


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
    :param verbose: 1 prints a message at each reduction where Keras sends its own (stdout, or
        logging after ``keras.config.disable_interactive_logging()``).
    :param mode: ``"auto"``, ``"min"`` or ``"max"``.
    :param min_delta: smallest change that counts as an improvement.
    :param cooldown: epochs to wait after a reduction before counting again.
    :param min_lr: lower bound of the learning rate.
    :param strict: raise :class:`corebus.ConfigError` whenever ``monitor`` is missing from the
        logs, even in an epoch that ran no validation (``validation_freq``). Without it a name
        the logs do not have is still an error at the first epoch end, listing the available
        keys and the close match (``val_acc`` -> ``val_accuracy``), where Keras warns and never
        reduces; only a ``val_*`` monitor in an epoch without validation is skipped.
    :param optimizers: which optimizers to reduce, in a custom step with several
        (``optimizer={"generator": ..., "discriminator": ...}``): a name or a list of names.
        ``None`` (the default) reduces every optimizer of the run: the one optimizer of an
        ordinary run, and *all* of a multi-optimizer custom step. One monitor and one
        patience / cooldown count decide for all of them; each named optimizer's LR
        (``trainer.lr_for(name)``) is then reduced on its own, with ``min_lr`` applied to each,
        so an optimizer already at ``min_lr`` stays there while the others go down. Unknown
        names fail at train begin, before any step. The epoch logs get each rate under
        ``trainer.learning_rate_key(name)``: ``learning_rate`` in a run with one optimizer,
        ``learning_rate/<name>`` per optimizer in a run with several.

    Differences from Keras: bad values (``factor >= 1`` or negative, negative ``patience``,
    ``cooldown`` or ``min_lr``, unknown ``mode``) raise :class:`corebus.ConfigError` at
    construction (Keras raises for ``factor`` only, and falls back to ``auto`` for a bad mode);
    the direction of ``mode="auto"`` is decided at train begin when the model's metrics tell it
    (else at the first epoch end, after the name check); a vector-valued monitor
    (``F1Score(average=None)``) is an error at the first epoch end (Keras fails at its first
    comparison with "truth value of an array is ambiguous"); messages go through Keras's
    ``io_utils.print_msg`` as Keras's do; it
    can drive several optimizers (``optimizers=``). The state (:meth:`state_dict`) survives a
    resume: a restored instance does not reset its counters at the next train begin.
    """

    controls = {"lr.multiplier"}  # per instance: narrowed to the named optimizers

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
        optimizers: Iterable[str] | str | None = None,
    ):
        if not 0.0 <= factor < 1.0:
            raise ConfigError(
                f"ReduceLROnPlateau: factor={factor!r} must be in [0, 1) (new_lr = lr * factor); "
                "Keras rejects factor >= 1.0 too"
            )
        for label, value in (("patience", patience), ("cooldown", cooldown)):
            check_number("ReduceLROnPlateau", label, value, at_least=0, integer=True, unit="epochs")
        check_number("ReduceLROnPlateau", "min_lr", min_lr, at_least=0)
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
        self.optimizers = optimizer_names(optimizers, "ReduceLROnPlateau")
        if self.optimizers is not None:
            # Ownership is per optimizer: plateaus on different optimizers do not compete.
            self.controls = {f"lr.multiplier[{name}]" for name in self.optimizers}
        self.multiplier = 1.0  # of the first driven optimizer (the default one in a plain run)
        self.multipliers: dict[str, float] = {}
        self._restored = False

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _targets(self, trainer: Any) -> list[str]:
        """The optimizer names this plugin reduces in this run."""
        return list(self.optimizers) if self.optimizers is not None else list(trainer.optimizers)

    @hookimpl
    def on_train_begin(self, trainer):
        trainer.check_optimizer_names(self.optimizers, "ReduceLROnPlateau")
        # Early where the model's metrics tell the direction; a name they do not know (a typo,
        # a custom metric) waits for the first epoch end, where the name is checked first.
        self._monitor.try_resolve(trainer.model)
        # Keras resets at every fit; a resumed run keeps the counters it was restored with.
        if not self._restored:
            self.best, self.wait, self.cooldown_counter = None, 0, 0
        self._restored = False
        self._record_multipliers(trainer)

    def _record_multipliers(self, trainer: Any) -> None:
        self.multipliers = {name: trainer.lr_for(name).multiplier for name in self._targets(trainer)}
        self.multiplier = next(iter(self.multipliers.values()), 1.0)

    @hookimpl
    def on_epoch_end(self, trainer, epoch, logs):
        for name in self._targets(trainer):
            logs[trainer.learning_rate_key(name)] = trainer.lr_for(name).value
        current = self._monitor.current(logs, trainer)
        if current is None:
            return
        self._monitor.resolve(trainer.model)
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
        """Reduce every driven optimizer still above ``min_lr``; True if any was reduced."""
        reduced = False
        for name in self._targets(trainer):
            lr = trainer.lr_for(name)
            old = lr.value
            if not old > np.float32(self.min_lr):
                continue
            new = max(old * self.factor, self.min_lr)
            # Scaling the multiplier scales whatever produces the base LR (a constant or a
            # schedule); the min_lr clamp becomes the ratio that lands the current LR on min_lr.
            ratio = self.factor if new == old * self.factor else new / old
            lr.multiplier = lr.multiplier * ratio
            reduced = True
            if self.verbose > 0:
                which = "" if name == "default" else f" of {name!r}"
                _print_msg(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate{which} to {new}.")
        self._record_multipliers(trainer)
        return reduced

    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
            "best": self.best,
            "multiplier": self.multiplier,
            "multipliers": dict(self.multipliers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.best = None if state["best"] is None else float(state["best"])
        self.multiplier = float(state["multiplier"])
        # Snapshots from before per-optimizer plateaus have "multiplier" only. The LR itself
        # is restored with the run's LR state; these are the plugin's record of it.
        self.multipliers = {str(k): float(v) for k, v in dict(state.get("multipliers", {})).items()}
        self._restored = True


def _print_msg(message: str) -> None:
    # Where Keras's callbacks send their messages: stdout, or absl logging after
    # keras.config.disable_interactive_logging(). Imported late: Keras is heavy to import.
    from keras.src.utils import io_utils

    io_utils.print_msg(message)
