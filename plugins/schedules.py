"""Learning-rate schedules Keras lacks, as ``keras.optimizers.schedules.LearningRateSchedule``.

Not a plugin: plain Keras schedules, usable as ``SGD(learning_rate=StepDecay(...))`` in any
Keras code, or through the ``lr_schedule`` plugin (``LRSchedule("step", ...)``). Each is
written with ``keras.ops`` so it traces into the compiled step, is evaluated at the optimizer's
``iterations`` (updates done before this one, as Keras does), and is registered as
``corebus>Name`` so a saved model or optimizer config deserialises it.

Cosine decay with warm restarts is Keras's own ``CosineDecayRestarts``; it is not repeated here.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


@keras.saving.register_keras_serializable(package="corebus")
class StepDecay(LearningRateSchedule):
    """Drop the learning rate by ``drop`` at fixed intervals (the classic "step decay").

    Two ways to say when it drops (give exactly one):

    - ``steps_per_epoch``: the classic epoch formula, evaluated per step with
      ``epoch = floor(step / steps_per_epoch)``::

          lr = initial_learning_rate * drop ** floor((1 + epoch) / epochs_drop)

      (so the first drop comes at the start of epoch ``epochs_drop - 1``, as in the formula);
    - ``decay_steps``: by step count, ``lr = initial_learning_rate * drop ** floor(step /
      decay_steps)``, the same values as ``ExponentialDecay(..., staircase=True)``.

    The ``lr_schedule`` plugin fills ``steps_per_epoch`` from the run when neither is given.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        drop: float = 0.5,
        epochs_drop: float = 10.0,
        steps_per_epoch: int | None = None,
        decay_steps: int | None = None,
        name: str = "StepDecay",
    ):
        super().__init__()
        if (steps_per_epoch is None) == (decay_steps is None):
            raise ValueError(
                "StepDecay needs exactly one of steps_per_epoch (epoch formula) or decay_steps "
                f"(step count); got steps_per_epoch={steps_per_epoch}, decay_steps={decay_steps}"
            )
        for label, value in (
            ("steps_per_epoch", steps_per_epoch),
            ("decay_steps", decay_steps),
            ("epochs_drop", epochs_drop),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"StepDecay: {label} must be > 0, got {value}")
        self.initial_learning_rate = initial_learning_rate
        self.drop = drop
        self.epochs_drop = epochs_drop
        self.steps_per_epoch = steps_per_epoch
        self.decay_steps = decay_steps
        self.name = name

    def __call__(self, step):
        with keras.name_scope(self.name):
            initial = ops.convert_to_tensor(self.initial_learning_rate)
            dtype = initial.dtype
            step = ops.cast(step, dtype)
            if self.decay_steps is not None:
                exponent = ops.floor(step / ops.cast(self.decay_steps, dtype))
            else:
                epoch = ops.floor(step / ops.cast(self.steps_per_epoch, dtype))
                exponent = ops.floor((1.0 + epoch) / ops.cast(self.epochs_drop, dtype))
            return initial * ops.power(ops.cast(self.drop, dtype), exponent)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "drop": self.drop,
            "epochs_drop": self.epochs_drop,
            "steps_per_epoch": self.steps_per_epoch,
            "decay_steps": self.decay_steps,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="corebus")
class LinearWarmup(LearningRateSchedule):
    """Ramp linearly to ``warmup_target`` over ``warmup_steps``, then run ``after``.

    ``lr = initial_learning_rate + (warmup_target - initial_learning_rate) * step /
    warmup_steps`` for ``step < warmup_steps``; then ``after(step - warmup_steps)``, so the
    wrapped schedule starts at its own step 0 when the warm-up ends (as Keras's
    ``CosineDecay(warmup_target=..., warmup_steps=...)`` does). ``warmup_target`` defaults to
    ``after(0)``, the wrapped schedule's first value; with no ``after`` the LR stays at
    ``warmup_target``. ``after`` may be any ``LearningRateSchedule`` (a user subclass too) or a
    traceable ``step -> lr`` callable.
    """

    def __init__(
        self,
        warmup_steps: int,
        warmup_target: float | None = None,
        after: Any = None,
        initial_learning_rate: float = 0.0,
        name: str = "LinearWarmup",
    ):
        super().__init__()
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"LinearWarmup: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if warmup_target is None and after is None:
            raise ValueError("LinearWarmup needs warmup_target, a schedule to warm up into (after=...), or both")
        self.warmup_steps = warmup_steps
        self.warmup_target = warmup_target
        self.after = after
        self.initial_learning_rate = initial_learning_rate
        self.name = name

    def __call__(self, step):
        with keras.name_scope(self.name):
            step = ops.convert_to_tensor(step)
            x = ops.cast(step, "float32")
            if self.warmup_target is not None:
                target = ops.cast(self.warmup_target, "float32")
            else:
                target = ops.cast(self.after(ops.zeros_like(step)), "float32")
            if self.after is None:
                post = target
            else:
                # The wrapped schedule gets a step of the dtype it would get from an optimizer.
                shifted = ops.maximum(step - ops.cast(self.warmup_steps, step.dtype), 0)
                post = ops.cast(self.after(shifted), "float32")
            if self.warmup_steps == 0:
                return post
            start = ops.cast(self.initial_learning_rate, "float32")
            warm = start + (target - start) * x / float(self.warmup_steps)
            return ops.where(x < float(self.warmup_steps), warm, post)

    def get_config(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "warmup_target": self.warmup_target,
            "after": keras.saving.serialize_keras_object(self.after),
            "initial_learning_rate": self.initial_learning_rate,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LinearWarmup":
        config = dict(config)
        config["after"] = keras.saving.deserialize_keras_object(config["after"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="corebus")
class CyclicalLR(LearningRateSchedule):
    """Cyclical learning rate (Smith, 2015, "Cyclical Learning Rates for Training Neural Networks").

    The LR moves between ``base_lr`` and ``max_lr`` in triangles of ``2 * step_size`` steps::

        cycle = floor(1 + step / (2 * step_size))
        x = |step / step_size - 2 * cycle + 1|
        lr = base_lr + (max_lr - base_lr) * max(0, 1 - x) * scale

    with ``scale`` = 1 (``mode="triangular"``), ``1 / 2 ** (cycle - 1)`` (``"triangular2"``,
    the amplitude halves every cycle) or ``gamma ** step`` (``"exp_range"``).
    """

    MODES = ("triangular", "triangular2", "exp_range")

    def __init__(
        self,
        base_lr: float = 0.001,
        max_lr: float = 0.006,
        step_size: float = 2000.0,
        mode: str = "triangular",
        gamma: float = 1.0,
        name: str = "CyclicalLR",
    ):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"CyclicalLR: mode={mode!r} is unknown; use one of {', '.join(self.MODES)}")
        if step_size <= 0:
            raise ValueError(f"CyclicalLR: step_size must be > 0, got {step_size}")
        self.base_lr = base_lr
        self.max_lr = max_lr
        self.step_size = step_size
        self.mode = mode
        self.gamma = gamma
        self.name = name

    def __call__(self, step):
        with keras.name_scope(self.name):
            base = ops.convert_to_tensor(self.base_lr, "float32")
            step = ops.cast(step, "float32")
            step_size = ops.cast(self.step_size, "float32")
            cycle = ops.floor(1.0 + step / (2.0 * step_size))
            x = ops.abs(step / step_size - 2.0 * cycle + 1.0)
            amplitude = (self.max_lr - self.base_lr) * ops.maximum(0.0, 1.0 - x)
            if self.mode == "triangular2":
                amplitude = amplitude / ops.power(2.0, cycle - 1.0)
            elif self.mode == "exp_range":
                amplitude = amplitude * ops.power(ops.cast(self.gamma, "float32"), step)
            return base + amplitude

    def get_config(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "max_lr": self.max_lr,
            "step_size": self.step_size,
            "mode": self.mode,
            "gamma": self.gamma,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="corebus")
class StepFunction(LearningRateSchedule):
    """A ``step -> lr`` callable as a schedule: the step arrives as a float32 scalar tensor."""

    def __init__(self, function: Any, name: str = "StepFunction"):
        super().__init__()
        self.function = function
        self.name = name

    def __call__(self, step):
        return ops.cast(self.function(ops.cast(step, "float32")), "float32")

    def get_config(self) -> dict[str, Any]:
        return {"function": keras.saving.serialize_keras_object(self.function), "name": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "StepFunction":
        return cls(keras.saving.deserialize_keras_object(config["function"]), config.get("name", "StepFunction"))


__all__ = ["CyclicalLR", "LinearWarmup", "StepDecay", "StepFunction"]
