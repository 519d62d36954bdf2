"""Gradient accumulation: one optimizer update every ``steps`` micro-batches (Keras's
``gradient_accumulation_steps``)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from corebus import ConfigError, hookimpl
from corebus.kit import optimizer_names


class GradientAccumulation:
    """Sum the gradients of ``steps`` micro-batches and apply their mean as one update.

    With plain SGD, ``steps=4`` at ``batch_size=16`` gives the same weights as ``batch_size=64``
    (for a mean-reduced loss), with the memory of a batch of 16. The accumulation itself runs in
    corebus's gradient pipeline, compiled into the step; this plugin only declares how many
    micro-batches make one update. It works in ``Trainer.fit`` and, through
    ``model.compile(optimizer=callback.wrap_optimizer("sgd"))``, in ``model.fit``. Do not also
    set ``gradient_accumulation_steps`` on the optimizer: that would accumulate twice.

    What counts **optimizer updates**, not micro-batches: ``optimizer.iterations``,
    ``trainer.global_step``, every :class:`corebus.Cadence` ("every N steps") and learning-rate
    schedules (the schedule sees the update count, so ``steps=4`` at batch 16 follows the same LR
    trajectory as batch 64). Keras's own ``gradient_accumulation_steps`` differs on one point:
    its schedules see micro-batches. ``trainer.micro_step`` counts batches. Clipping
    (:class:`GradientClipping`) sees the accumulated mean gradient, as in Keras. A partial
    accumulation at the end of an epoch carries over into the next epoch, as in Keras.

    :param steps: micro-batches per update (an integer >= 1; 1 updates every batch).
    :param optimizers: names of the optimizers that accumulate in a custom step with several
        optimizers; ``None`` means all of them.
    """

    controls = {"grads.accumulation"}

    def __init__(self, steps: int, optimizers: Iterable[str] | str | None = None):
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ConfigError(
                f"GradientAccumulation steps={steps!r} must be an integer >= 1 (micro-batches per update)"
            )
        self.steps = int(steps)
        self.optimizers = optimizer_names(optimizers, "GradientAccumulation")

    @hookimpl
    def on_train_begin(self, trainer):
        trainer.check_optimizer_names(self.optimizers, "GradientAccumulation")

    @hookimpl
    def gradient_accumulation_steps(self, optimizer_name):
        if self.optimizers is None or optimizer_name in self.optimizers:
            return self.steps
        return None

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-friendly): ``GradientAccumulation(**get_config())``."""
        return {"steps": self.steps, "optimizers": self.optimizers}

    def state_dict(self) -> dict[str, Any]:
        # The partial sums live in the pipeline's variables (saved with the run snapshot); what
        # the plugin owns is the meaning of a step, which a resume must not change.
        return {"steps": self.steps, "optimizers": self.optimizers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state.get("steps"), state.get("optimizers"))
        if saved != (self.steps, self.optimizers):
            raise ConfigError(
                f"the checkpoint was trained with GradientAccumulation(steps={saved[0]}, "
                f"optimizers={saved[1]}), this run has steps={self.steps}, optimizers={self.optimizers}: "
                "resume with the same settings (global_step counts updates of that many micro-batches)"
            )

    def __repr__(self) -> str:
        extra = f", optimizers={self.optimizers!r}" if self.optimizers is not None else ""
        return f"GradientAccumulation(steps={self.steps}{extra})"
