"""A learning-rate schedule as a plugin: Keras's schedules by name, yours, or a function."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Callable

import keras
import numpy as np

from corebus import ConfigError, hookimpl
from corebus.kit import check_choice, optimizer_names
from corebus.plugins.schedules import CyclicalLR, LinearWarmup, StepDecay, StepFunction

_schedules = keras.optimizers.schedules
KNOWN: dict[str, Any] = {
    "exponential": _schedules.ExponentialDecay,
    "step": StepDecay,
    "cosine": _schedules.CosineDecay,  # CosineDecayRestarts when given first_decay_steps
    "cyclical": CyclicalLR,
    "polynomial": _schedules.PolynomialDecay,
    "inverse_time": _schedules.InverseTimeDecay,
    "piecewise_constant": _schedules.PiecewiseConstantDecay,
}
_RESTARTS = ("first_decay_steps", "t_mul", "m_mul")


class LRSchedule:
    """Own the learning rate with a schedule; ``trainer.lr.multiplier`` still scales it.

    ``schedule`` is one of:

    - a name with its Keras parameters: ``LRSchedule("exponential", initial_learning_rate=0.1,
      decay_steps=100, decay_rate=0.9, staircase=True)``. Names: ``exponential``, ``step``
      (:class:`~corebus.plugins.schedules.StepDecay`; ``steps_per_epoch`` defaults to the
      run's updates per epoch), ``cosine`` (Keras ``CosineDecay``; with ``first_decay_steps``
      / ``t_mul`` / ``m_mul``, ``CosineDecayRestarts``), ``cyclical`` (``CyclicalLR``: modes
      triangular, triangular2, exp_range), ``polynomial``, ``inverse_time``,
      ``piecewise_constant``. ``initial_learning_rate`` defaults to the optimizer's LR;
    - a ``keras.optimizers.schedules.LearningRateSchedule`` instance (your subclasses too);
    - a function. ``per="step"``: ``fn(step) -> lr``, traced into the compiled step, ``step``
      a float32 scalar tensor. ``per="epoch"``: ``fn(epoch, lr) -> lr`` (or ``fn(epoch)``),
      called on the host at each epoch start, exactly like
      ``keras.callbacks.LearningRateScheduler``; ``lr`` is the base LR (before a plateau
      multiplier, so the two compose). A name or schedule instance with ``per="epoch"`` is
      evaluated at the epoch index.

    Per-step schedules are evaluated at the optimizer's ``iterations`` (updates done, so with
    gradient accumulation they count updates, not batches), as Keras evaluates them.
    ``warmup_steps`` (and ``warmup_target``, default the schedule's first value) prepend a
    linear warm-up from 0, the schedule starting at its own step 0 after it. For ``cosine``
    with a ``warmup_target`` it is Keras's own ``CosineDecay`` warm-up instead (from
    ``initial_learning_rate`` to ``warmup_target``). The epoch logs get ``learning_rate``.

    A second schedule (another ``lr_schedule`` plugin, or an optimizer built with its own
    ``LearningRateSchedule``) on the same optimizer is a :class:`corebus.ConfigError` naming both.

    ``optimizers`` says which optimizers the schedule drives, in a custom step with several
    (``optimizer={"generator": ..., "discriminator": ...}``): a name or a list of names, each
    driven through ``trainer.lr_for(name)`` with its own copy of the schedule
    (``initial_learning_rate`` defaulting to that optimizer's LR). ``None`` (the default)
    means every optimizer of the run: the one optimizer of an ordinary run, and *all* of a
    multi-optimizer custom step. Unknown names fail at train begin, before any step. The
    epoch logs get the rate under ``trainer.learning_rate_key(name)``, the engine's key:
    ``learning_rate`` in a run with one optimizer, ``learning_rate/<name>`` per optimizer in a
    run with several. Two ``lr_schedule`` plugins on different optimizers do not conflict.
    """

    controls = {"lr.schedule"}  # per instance: narrowed to the named optimizers

    def __init__(
        self,
        schedule: Any,
        per: str = "step",
        warmup_steps: int = 0,
        warmup_target: float | None = None,
        verbose: int = 0,
        optimizers: Iterable[str] | str | None = None,
        **params: Any,
    ):
        check_choice("LRSchedule", "per", per, ("step", "epoch"))
        if per == "epoch" and (warmup_steps or warmup_target is not None):
            raise ConfigError("LRSchedule: warmup_steps/warmup_target count optimizer steps; use per='step'")
        if warmup_target is not None and not warmup_steps and schedule != "cosine":
            raise ConfigError("LRSchedule: warmup_target needs warmup_steps (the steps to reach it)")
        if isinstance(schedule, str):
            if schedule not in KNOWN:
                raise ConfigError(
                    f"LRSchedule: unknown schedule {schedule!r}; known names: {', '.join(KNOWN)} "
                    "(or pass a keras LearningRateSchedule instance or a function)"
                )
        elif params:
            raise ConfigError(f"LRSchedule: parameters {sorted(params)} are for schedule names only")
        elif not callable(schedule):
            raise ConfigError(
                f"LRSchedule: schedule must be a name, a LearningRateSchedule or a function, got {schedule!r}"
            )
        self.schedule, self.per, self.verbose, self.params = schedule, per, verbose, params
        self.warmup_steps, self.warmup_target = warmup_steps, warmup_target
        self.optimizers = optimizer_names(optimizers, "LRSchedule")
        if self.optimizers is not None:
            # Ownership is per optimizer: schedules on "generator" and on "discriminator" do not
            # compete. None keeps the plain key, so two unnamed schedules still clash at once.
            self.controls = {f"lr.schedule[{name}]" for name in self.optimizers}
        self._steps_per_epoch: dict[str, int] = {}
        self._restored_steps: int | dict[str, int] | None = None
        self._installed: dict[str, Any] = {}  # optimizer name -> its LR object once this plugin set it
        self._epoch_fns: dict[str, Any] = {}
        self._build(initial_learning_rate=1.0, steps_per_epoch=1)  # bad params fail now

    def _build(self, initial_learning_rate: float, steps_per_epoch: int) -> Any:
        """The schedule to install (or, per epoch, to call); run-dependent defaults filled in."""
        schedule, native_warmup = self.schedule, False
        if isinstance(schedule, str):
            params = dict(self.params)
            cls = KNOWN[schedule]
            if schedule == "cosine" and any(k in params for k in _RESTARTS):
                cls = _schedules.CosineDecayRestarts
            elif schedule == "cosine" and self.warmup_target is not None:
                # Keras's own warm-up: from initial_learning_rate to warmup_target, then decay.
                params.update(warmup_target=self.warmup_target, warmup_steps=self.warmup_steps)
                native_warmup = True
            if "initial_learning_rate" in inspect.signature(cls).parameters:
                params.setdefault("initial_learning_rate", initial_learning_rate)
            if cls is StepDecay and params.get("decay_steps") is None:
                params.setdefault("steps_per_epoch", steps_per_epoch)
            try:
                schedule = cls(**params)
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"LRSchedule({self.schedule!r}) rejected its params {self.params}: {exc}. "
                    f"Accepted: {cls.__name__}{inspect.signature(cls)}"
                ) from None
        if self.per == "epoch":
            return schedule
        if not isinstance(schedule, _schedules.LearningRateSchedule):
            schedule = StepFunction(schedule)
        if self.warmup_steps and not native_warmup:
            try:
                schedule = LinearWarmup(self.warmup_steps, self.warmup_target, after=schedule)
            except ValueError as exc:
                raise ConfigError(f"LRSchedule: {exc}") from None
        return schedule

    def _own_name(self, trainer: Any) -> str:
        """The name this plugin is registered under (the schedule's owner in errors)."""
        return next((n for n, p in trainer.bus.plugins.items() if p is self), "lr_schedule")

    def _targets(self, trainer: Any) -> list[str]:
        """The optimizer names this schedule drives in this run."""
        return list(self.optimizers) if self.optimizers is not None else list(trainer.optimizers)

    @property
    def steps_per_epoch(self) -> int | dict[str, int] | None:
        """Optimizer updates per epoch the schedule was built with: one number when every
        driven optimizer agrees (always, without per-optimizer gradient accumulation), else
        a number per optimizer name."""
        if self._restored_steps is not None:  # loaded, not installed yet
            restored = self._restored_steps
            return dict(restored) if isinstance(restored, dict) else restored
        values = set(self._steps_per_epoch.values())
        if not values:
            return None
        return values.pop() if len(values) == 1 else dict(self._steps_per_epoch)

    @hookimpl
    def on_train_begin(self, trainer):
        trainer.check_optimizer_names(self.optimizers, "LRSchedule")
        name = self._own_name(trainer)
        # A later fit on the same optimizer: the compiled step already evaluates this schedule,
        # and installing a new one would leave it reading the old multiplier variable.
        # (lr_for(t) is the LR of the optimizer owning it, the inner one of a loss scaler.)
        targets = [
            t
            for t in self._targets(trainer)
            if self._installed.get(t) is None or trainer.lr_for(t).installed_schedule is not self._installed[t]
        ]
        if not targets:
            return
        if self.per == "epoch":
            for target in targets:
                if trainer.lr_for(target).has_schedule:
                    raise self._conflict(name, trainer.lr_for(target).schedule_owner)
        restored, self._restored_steps = self._restored_steps, None
        if restored is not None:
            self._steps_per_epoch = {}
        for target in targets:
            # A resumed run keeps the steps per epoch it started with.
            if isinstance(restored, dict) and target in restored:
                self._steps_per_epoch[target] = int(restored[target])
            elif isinstance(restored, int):
                self._steps_per_epoch[target] = restored
            else:
                self._steps_per_epoch[target] = self._updates_per_epoch(trainer, target)
        installed = False
        for target in targets:
            lr = trainer.lr_for(target)
            schedule = self._build(lr.value, self._steps_per_epoch[target])
            if self.per == "epoch":
                self._epoch_fns[target] = schedule
                continue
            try:
                lr.set_schedule(schedule, owner=name)
            except RuntimeError:
                raise self._conflict(name, lr.schedule_owner) from None
            self._installed[target] = lr.installed_schedule
            installed = True
        # model.fit may reuse a step traced before the schedule existed: retrace it.
        if installed and getattr(trainer.model, "train_function", None) is not None:
            trainer.model.make_train_function(force=True)

    def _updates_per_epoch(self, trainer: Any, optimizer_name: str) -> int:
        if self.per == "epoch":
            return 1  # evaluated at the epoch index
        steps = trainer.params.get("steps")
        needed = self.schedule == "step" and not {"steps_per_epoch", "decay_steps"} & set(self.params)
        if steps is None and needed:
            raise ConfigError("LRSchedule('step'): the run's steps per epoch are unknown; pass steps_per_epoch=")
        return max(1, (steps or 1) // trainer.accumulation_steps(optimizer_name))

    @staticmethod
    def _conflict(name: str, owner: str | None) -> ConfigError:
        fix = "build the optimizer with a float learning_rate" if owner == "optimizer" else "remove one plugin"
        return ConfigError(
            f"two learning-rate schedules: {owner!r} already owns the learning rate and the "
            f"{name!r} plugin wants it too; keep one ({fix})"
        )

    @hookimpl
    def on_epoch_begin(self, trainer, epoch):
        if self.per != "epoch":
            return
        for target in self._targets(trainer):
            function: Callable = self._epoch_fns[target]
            lr = trainer.lr_for(target)
            try:  # Keras's LearningRateScheduler protocol: fn(epoch, lr), else fn(epoch)
                value = function(epoch, lr.base)
            except TypeError:
                value = function(epoch)
            try:
                value = float(np.asarray(keras.ops.convert_to_numpy(value)).item())
            except (TypeError, ValueError):
                raise ConfigError(f"LRSchedule: the schedule function must return a float, got {value!r}") from None
            lr.set(value)
            if self.verbose > 0:
                which = "" if target == "default" else f" of {target!r}"
                _print_msg(f"\nEpoch {epoch + 1}: LRSchedule setting learning rate{which} to {value}.")

    # tryfirst: record the LR the epoch ended with, before a plateau plugin changes it.
    @hookimpl(tryfirst=True)
    def on_epoch_end(self, trainer, logs):
        for target in self._targets(trainer):
            logs[trainer.learning_rate_key(target)] = trainer.lr_for(target).value

    def state_dict(self) -> dict[str, Any]:
        return {"steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # An int (every snapshot from before per-optimizer schedules, and most after) applies
        # to every driven optimizer; a dict holds one per optimizer name. Used at the next install.
        steps = state.get("steps_per_epoch")
        self._restored_steps = (
            {str(k): int(v) for k, v in steps.items()}
            if isinstance(steps, dict)
            else (None if steps is None else int(steps))
        )


def _print_msg(message: str) -> None:
    # Where Keras's callbacks send their messages: stdout, or absl logging after
    # keras.config.disable_interactive_logging(). Imported late: Keras is heavy to import.
    from keras.src.utils import io_utils

    io_utils.print_msg(message)
