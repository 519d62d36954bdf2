"""One owner for the learning rate: ``lr = base_or_schedule(step) x multiplier``.

Why one owner: a Keras optimizer built with a ``LearningRateSchedule`` refuses both
``learning_rate.assign`` (AttributeError) and the setter (TypeError), which is why Keras's
ReduceLROnPlateau crashes next to a schedule. Here a schedule (a plugin's or the user's own
``Adam(learning_rate=ExponentialDecay(...))``) is evaluated inside the compiled step from the
optimizer's step counter, and a plateau multiplier is a variable changed at epoch end, so the
two compose and no step pays a host round-trip for its learning rate.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="corebus")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule(step) * multiplier``, where ``multiplier`` is a variable plugins change."""

    def __init__(self, schedule: Any, multiplier: float | tf.Variable = 1.0):
        self.schedule = schedule
        if isinstance(multiplier, tf.Variable):
            self.multiplier = multiplier
        else:
            with tf.init_scope():
                self.multiplier = tf.Variable(
                    float(multiplier), trainable=False, dtype=tf.float32, name="lr_multiplier"
                )

    def __call__(self, step):
        value = self.schedule(step)
        return tf.cast(value, tf.float32) * self.multiplier

    def get_config(self) -> dict[str, Any]:
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "multiplier": float(self.multiplier.numpy()),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ScaledSchedule":
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["multiplier"])


class LearningRateController:
    """The trainer-level LR handle (``trainer.lr``) for one optimizer.

    - ``value``: the effective learning rate now (one host read; use at epoch granularity).
    - ``set(v)``: set the constant base learning rate (refused while a schedule owns it).
    - ``multiplier``: the plateau factor; the effective LR is ``base_or_schedule * multiplier``.
    - ``set_schedule(s)``: let a schedule (``LearningRateSchedule`` or ``step -> lr``) own the
      base; it runs inside the compiled step.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer):
        self.optimizer = optimizer
        self._schedule_owner: str | None = None
        self._multiplier = 1.0
        current = optimizer._learning_rate
        if isinstance(current, ScaledSchedule):
            self._multiplier = float(current.multiplier.numpy())
            self._schedule_owner = "optimizer"
        elif isinstance(current, keras.optimizers.schedules.LearningRateSchedule) or (
            callable(current) and not isinstance(current, keras.Variable)
        ):
            # The user built the optimizer with a schedule: adopt it so a plateau plugin can
            # still scale it (the case that crashes plain Keras).
            self._install(current, owner="optimizer")

    # ---------------------------------------------------------------- reading

    @property
    def has_schedule(self) -> bool:
        return isinstance(self.optimizer._learning_rate, ScaledSchedule)

    @property
    def schedule_owner(self) -> str | None:
        return self._schedule_owner

    @property
    def installed_schedule(self) -> "ScaledSchedule | None":
        """The schedule the optimizer runs now (``None`` while its LR is a constant): a plugin
        that installed one compares it with ``is`` to see whether it is still in place."""
        current = self.optimizer._learning_rate
        return current if isinstance(current, ScaledSchedule) else None

    @property
    def value(self) -> float:
        """The effective learning rate at the optimizer's current step."""
        # Evaluated eagerly, like Keras: a compiled read can differ in the last float32 bit.
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    @property
    def base(self) -> float:
        """The learning rate before the multiplier."""
        return self.value / self._multiplier if self._multiplier else 0.0

    # ---------------------------------------------------------------- writing

    def set(self, value: float) -> None:
        """Set the constant base learning rate (the effective LR becomes ``value * multiplier``)."""
        if self.has_schedule:
            raise RuntimeError(
                f"the learning rate is owned by a schedule (set by {self._schedule_owner}); "
                "scale it with trainer.lr.multiplier instead of setting it"
            )
        self.optimizer._learning_rate.assign(float(value) * self._multiplier)

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        value = float(value)
        if self.has_schedule:
            self.optimizer._learning_rate.multiplier.assign(value)
        else:
            variable = self.optimizer._learning_rate
            base = float(variable.numpy()) / self._multiplier if self._multiplier else 0.0
            variable.assign(base * value)
        self._multiplier = value

    def set_schedule(self, schedule: Any, owner: str) -> None:
        """Let ``schedule`` own the base LR; a second owner is an error naming both."""
        if self._schedule_owner not in (None, owner):
            raise RuntimeError(
                f"two learning-rate schedules: {self._schedule_owner!r} already owns the "
                f"learning rate, {owner!r} wants it too; keep one"
            )
        self._install(schedule, owner)

    def _install(self, schedule: Any, owner: str) -> None:
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            schedule = _CallableSchedule(schedule)
        # The old variable stays tracked, so the optimizer's variable list (and checkpoints)
        # keep the same layout with or without a schedule. An existing multiplier variable is
        # reused: a step traced earlier keeps reading the same one.
        current = self.optimizer._learning_rate
        multiplier = current.multiplier if isinstance(current, ScaledSchedule) else self._multiplier
        self.optimizer._learning_rate = ScaledSchedule(schedule, multiplier)
        self._schedule_owner = owner

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"multiplier": self._multiplier, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.has_schedule:
            variable = self.optimizer._learning_rate
            variable.assign(float(state["value"]))
            self._multiplier = float(state["multiplier"])
        else:
            self.multiplier = state["multiplier"]


class _CallableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Adapts a traceable ``step -> lr`` callable."""

    def __init__(self, function: Any):
        self.function = function

    def __call__(self, step):
        return self.function(step)

    def get_config(self) -> dict[str, Any]:
        return {}
