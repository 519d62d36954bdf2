"""Stop (or fail) when the training loss becomes NaN or Inf, like ``keras.callbacks.TerminateOnNaN``."""

from __future__ import annotations

import math
from typing import Any

from corebus import Cadence, ConfigError, hookimpl
from corebus.kit import check_choice, check_number

ACTIONS = ("stop", "raise")


class TerminateOnNaN:
    """``keras.callbacks.TerminateOnNaN``, with the global step in the message.

    After each train call the batch ``loss`` (the epoch's running mean, as in Keras, so once a
    step is non-finite every later check of that epoch sees it) is checked:

    - ``action="stop"`` (Keras's default): print a message naming the global step, raise a
      ``nan_loss`` alert and set ``trainer.stop_training``; ``on_train_end`` still runs.
    - ``action="raise"`` (Keras's ``raise_error=True``): raise ``RuntimeError`` naming the step
      (the bus wraps it in :class:`corebus.PluginError`); ``on_train_end`` does not run.

    Cost: reading the loss forces the step's one batched device->host fetch, so with the
    default ``check_every=1`` the engine syncs every step, as ``model.fit`` always does.
    ``check_every=N`` reads it only when a multiple of N optimizer steps is crossed (a
    :class:`corebus.Cadence`, exact under ``steps_per_execution`` and resume); a NaN is then
    caught up to N - 1 steps late. The epoch-end loss is checked too (it is already on the host),
    so a NaN in the steps after the last check of an epoch is still caught at that epoch's end.
    """

    def __init__(self, action: str = "stop", check_every: int = 1, raise_error: bool | None = None):
        if raise_error is not None:  # Keras's spelling
            if action != "stop" and bool(raise_error) != (action == "raise"):
                raise ConfigError(
                    f"TerminateOnNaN: raise_error={raise_error!r} contradicts action={action!r}; pass one"
                )
            action = "raise" if raise_error else "stop"
        check_choice("TerminateOnNaN", "action", action, ACTIONS)
        check_number("TerminateOnNaN", "check_every", check_every, at_least=1, integer=True, unit="steps")
        self.action = action
        self.check_every = check_every
        self._cadence = Cadence.every_n(check_every)
        self.stopped_step: int | None = None

    @hookimpl
    def on_train_begin(self):
        self.stopped_step = None

    @hookimpl
    def on_train_batch_end(self, trainer, batch, logs):
        # check_every=1 checks every train call, like Keras, even between optimizer updates
        # (gradient accumulation); larger values follow the optimizer step.
        if self.check_every > 1 and not self._cadence.due_now(trainer):
            return
        if "loss" in logs:  # a name check: no fetch
            self._check(trainer, logs["loss"], f"batch {batch}")

    @hookimpl
    def on_epoch_end(self, trainer, epoch, logs):
        if self.stopped_step is None and logs and "loss" in logs:
            self._check(trainer, logs["loss"], f"end of epoch {epoch}")

    def _check(self, trainer: Any, loss: float, where: str) -> None:
        loss = float(loss)
        if math.isfinite(loss):
            return
        step = trainer.global_step
        if self.action == "raise":
            raise RuntimeError(
                f"NaN or Inf loss encountered at global step {step} (epoch {trainer.epoch}, {where}). "
                f"Loss value: {loss}. Terminating training immediately."
            )
        self.stopped_step = step
        message = f"Step {step} (epoch {trainer.epoch}, {where}): invalid loss {loss}, terminating training"
        _print_msg(message)
        trainer.alert("nan_loss", "Training stopped: non-finite loss", message, level="error")
        trainer.stop_training = True

    def state_dict(self) -> dict[str, Any]:
        # The cadence needs no state: it is decided from the global step, which resumes.
        return {"stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopped_step = state.get("stopped_step")


def _print_msg(message: str) -> None:
    # Where Keras's callbacks send their messages: stdout, or absl logging after
    # keras.config.disable_interactive_logging(). Imported late: Keras is heavy to import.
    from keras.src.utils import io_utils

    io_utils.print_msg(message)
