"""What every hook receives as ``trainer``: the run's state, with the objects that do its jobs.

Both the engine (:class:`corebus.Trainer`) and the Keras adapter (:class:`corebus.KerasCallback`)
drive plugins through the lifecycle methods here, so a plugin sees the same arguments, the same
order and the same step numbers in ``Trainer.fit`` and in ``model.fit``. Calling the hooks is
the job of the context's :class:`~corebus.engine.dispatch.Dispatch`; saving and restoring it
the job of its :class:`~corebus.engine.run_state.RunState`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from corebus.bus.bus import PluginBus
from corebus.bus.logs import LazyLogs
from corebus.delivery.alerts import Alert
from corebus.engine.dispatch import GRADIENT_TAPS, Dispatch
from corebus.engine.optimizer_chain import lr_owner
from corebus.engine.run_params import run_params
from corebus.engine.run_state import RunState


def optimizer_names(value: Any, owner: str) -> list[str] | None:
    """Validate a plugin's ``optimizers=`` argument: ``None`` (all), a name, or a list of names."""
    from corebus.errors import ConfigError

    names = [value] if isinstance(value, str) else (None if value is None else list(value))
    if names is not None and (not names or not all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"{owner} optimizers={value!r} must be None or a non-empty list of names")
    return names


class RunContext:
    """The run state plugins read and write.

    Attributes plugins use:
      ``model``, ``optimizer`` (the default one), ``optimizers`` (by name), ``lr`` (the LR
      handle of the default optimizer), ``global_step`` (optimizer updates done; with
      gradient accumulation, batches // accumulation steps), ``micro_step`` (batches trained),
      ``previous_global_step`` (before the last train call), ``epoch``, ``batch``,
      ``stop_training`` (set it to end ``fit`` after the current step), ``params``
      (``epochs``, ``steps``, ``batch_size``, ``verbose``...), ``mode`` (``"train"``,
      ``"test"``, ``"predict"``), ``rank`` / ``num_workers`` / ``is_chief`` /
      ``num_replicas`` (under ``tf.distribute``; a plugin declaring ``runs_on = "chief"`` is
      only registered on the chief).

    Its jobs are held by parts it owns: ``dispatch`` (:class:`~corebus.engine.dispatch.Dispatch`,
    calling the hooks) and ``run_state`` (:class:`~corebus.engine.run_state.RunState`, snapshots).
    """

    #: Whether a run snapshot taken mid-epoch can be resumed at that exact batch (the engine
    #: can; ``model.fit`` restarts epochs from their first batch).
    supports_mid_epoch_resume = True

    def __init__(self) -> None:
        self.dispatch = Dispatch(self)
        self.run_state = RunState(self)
        self.model: Any = None
        self.optimizers: dict[str, Any] = {}
        self.global_step = 0
        self.previous_global_step = 0
        self.micro_step = 0
        self._accumulation = 1
        self._pipeline: Any = None
        self.epoch = 0
        self.batch = 0
        self.params: dict[str, Any] = {}
        self.mode = "train"
        self._stop_training = False
        self._lr: Any = None
        self._lr_by_name: dict[str, Any] = {}
        self._at_epoch_end = False  # position: a snapshot now resumes at the next epoch's start
        self._resume_at: tuple[int, int] | None = None
        # where this process stands under tf.distribute (one process, one replica: 0, 1, 1, True)
        self.rank = 0
        self.num_workers = 1
        self.num_replicas = 1
        self.is_chief = True

    @property
    def bus(self) -> PluginBus:
        """The run's plugin bus."""
        return self.dispatch.bus

    @property
    def gradient_taps(self) -> frozenset[str]:
        """What the run's plugins ask the gradient pipeline for (:data:`GRADIENT_TAPS`)."""
        return self.dispatch.gradient_taps

    # ---------------------------------------------------------------- state plugins use

    @property
    def optimizer(self) -> Any:
        return self.optimizers.get("default") or next(iter(self.optimizers.values()), None)

    @property
    def lr(self) -> Any:
        """The :class:`corebus.engine.lr.LearningRateController` of the default optimizer."""
        owner = lr_owner(self.optimizer)
        if self._lr is None or self._lr.optimizer is not owner:
            from corebus.engine.lr import LearningRateController

            self._lr = LearningRateController(owner)
        return self._lr

    def check_optimizer_names(self, names: list[str] | None, owner: str) -> None:
        """Fail before training when a plugin names an optimizer this run does not have."""
        from corebus.errors import ConfigError

        unknown = sorted(set(names or ()) - set(self.optimizers))
        if unknown:
            raise ConfigError(
                f"{owner} optimizers={names}: no optimizer named {unknown}; this run has {sorted(self.optimizers)}"
            )

    def lr_for(self, optimizer_name: str) -> Any:
        """The LR handle of a named optimizer (custom steps with several optimizers)."""
        if self.optimizers.get(optimizer_name) is self.optimizer:
            return self.lr
        optimizer = lr_owner(self.optimizers[optimizer_name])
        handle = self._lr_by_name.get(optimizer_name)
        if handle is None or handle.optimizer is not optimizer:
            from corebus.engine.lr import LearningRateController

            handle = self._lr_by_name[optimizer_name] = LearningRateController(optimizer)
        return handle

    @property
    def stop_training(self) -> bool:
        return self._stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self._stop_training = bool(value)

    def alert(
        self,
        kind: str,
        title: str,
        text: str = "",
        level: str = "warning",
        *,
        details: str = "",
        resolves: str | None = None,
    ) -> Alert | None:
        """Raise an alert on the bus (``on_alert``), from any thread.

        It passes the run's :class:`corebus.AlertGate` (``trainer.alert_gate``: duplicates and
        alerts within the cooldown of their kind are held back). Returns the alert sent, or
        ``None`` when it was held back.
        """
        from corebus.delivery.alerts import AlertGate

        run = getattr(self, "run_name", None) or getattr(self.model, "name", None) or ""
        alert = Alert(
            kind=kind,
            title=title,
            text=text,
            level=level,
            step=self.global_step,
            epoch=self.epoch,
            run=str(run),
            details=details,
            resolves=resolves,
            rank=self.rank,
        )
        return AlertGate.of(self).dispatch(self, alert)

    # ---------------------------------------------------------------- steps

    def _use_bus(self, bus: PluginBus, compiled_for: PluginBus | None = None) -> None:
        """Dispatch through ``bus``; gradient taps follow ``compiled_for`` (see :meth:`Dispatch.use`)."""
        self.dispatch.use(bus, compiled_for)
        self._accumulation = self.accumulation_steps("default")

    def _start_steps(self, micro_step: int) -> None:
        """Set the step counters at the start of a run (``micro_step`` = batches trained)."""
        self.micro_step = micro_step
        self.global_step = self.previous_global_step = self._global_step_at(micro_step)

    def _advance(self, micro_steps_done: int) -> None:
        self.micro_step += micro_steps_done
        self.previous_global_step = self.global_step
        self.global_step = self._global_step_at(self.micro_step)

    def _global_step_at(self, micro_step: int) -> int:
        """Optimizer updates done after ``micro_step`` batches."""
        return micro_step // self._accumulation

    @property
    def gradient_pipeline(self) -> Any:
        if self._pipeline is None:
            from corebus.engine.gradients import GradientPipeline

            self._pipeline = GradientPipeline(self.dispatch)
        return self._pipeline

    def accumulation_steps(self, optimizer_name: str = "default") -> int:
        """Micro-batches per optimizer update (the ``gradient_accumulation_steps`` hook)."""
        return self.dispatch.accumulation_steps(optimizer_name)

    def transform_gradients(self, gradients: list, variables: list, optimizer_name: str = "default") -> list:
        """Run the gradient pipeline (trace time, inside the compiled step)."""
        return self.dispatch.transform_gradients(gradients, variables, optimizer_name)

    def learning_rate_key(self, optimizer_name: str) -> str:
        """The log name of an optimizer's learning rate: ``learning_rate``, or
        ``learning_rate/<name>`` per optimizer when there are several (none unlabelled)."""
        return "learning_rate" if len(self.optimizers) == 1 else f"learning_rate/{optimizer_name}"

    def learning_rate_logs(self) -> dict[str, Any]:
        """Each optimizer's current learning rate as a tensor, under :meth:`learning_rate_key`.
        Inside the compiled step (after the update) it is what ``lr.value`` reads after it."""
        import keras

        return {
            self.learning_rate_key(name): keras.ops.convert_to_tensor(lr_owner(optimizer).learning_rate)
            for name, optimizer in self.optimizers.items()
        }

    def run_params(self) -> dict[str, Any]:
        """What loggers record as run parameters (:func:`corebus.engine.run_params.run_params`):
        configuration only, JSON-safe, secrets redacted."""
        return run_params(self)

    # ---------------------------------------------------------------- lifecycle

    def _emit(self, hook: str, **kwargs: Any) -> None:
        self.dispatch.emit(hook, **kwargs)

    def _train_begin(self) -> None:
        self.mode = "train"
        if self.dispatch.held:  # left by a model.fit that raised (Keras has no exception hook)
            self.dispatch.hand_over()
        self.dispatch.hand_over_at = 0.0  # the first record goes at once
        self._emit("on_train_begin", logs={})

    def _epoch_begin(self, epoch: int) -> None:
        self.dispatch.epoch_clock = (time.perf_counter(), self.global_step)
        self.epoch = epoch
        self.mode = "train"
        self._emit("on_epoch_begin", epoch=epoch, logs={})

    def _train_batch_begin(self, batch: int) -> None:
        self.batch = batch
        self._emit("on_train_batch_begin", batch=batch, logs={})

    def _train_batch_end(
        self, batch: int, steps_done: int, logs: Mapping[str, Any], step_values: Mapping[str, Any] | None = None
    ) -> None:
        """``steps_done`` batches were trained in the call that just ended. ``step_values`` are
        what ``on_log`` gets: the last step's own values where known (default: ``logs``)."""
        log_now = self.dispatch.batch_log_due(steps_done)
        hold = self.dispatch.batch_log_due(steps_done, held=True)
        values = logs if step_values is None else step_values
        self._batch_ended(batch, steps_done, logs, values if log_now else None, values if hold else None)

    def _batch_ended(
        self,
        batch: int,
        steps_done: int,
        logs: Mapping[str, Any] | None,
        log_values: Mapping[str, Any] | None,
        held_values: Any = None,
    ) -> None:
        """Advance the steps, then ``on_train_batch_end`` and the batch records
        (:meth:`Dispatch.batch_ended`)."""
        self.batch = batch
        self._advance(steps_done)
        self.dispatch.batch_ended(batch, logs, log_values, held_values)

    def _epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.dispatch.hand_over()  # a logger's batch points come before the epoch's
        self._at_epoch_end = True
        try:
            self.dispatch.epoch_end(epoch, logs)
        finally:
            self._at_epoch_end = False
        self.dispatch.log_epoch_record()

    def _train_end(self, logs: dict[str, float] | None) -> None:
        self.dispatch.hand_over()
        self._emit("on_train_end", logs=logs)

    def _exception(self, exception: BaseException) -> None:
        self.dispatch.hand_over_on_exception(exception)
        self._emit("on_exception", exception=exception)

    def _test_begin(self) -> None:
        self.mode = "test"
        self._emit("on_test_begin", logs={})

    def _test_batch_begin(self, batch: int) -> None:
        self._emit("on_test_batch_begin", batch=batch, logs={})

    def _test_batch_end(self, batch: int, logs: Mapping[str, Any]) -> None:
        self._emit("on_test_batch_end", batch=batch, logs=logs)

    def _test_end(self, logs: dict[str, float]) -> None:
        self._emit("on_test_end", logs=logs)
        self.mode = "train"

    def _predict_begin(self) -> None:
        self.mode = "predict"
        self._emit("on_predict_begin", logs={})

    def _predict_batch_begin(self, batch: int) -> None:
        self._emit("on_predict_batch_begin", batch=batch, logs={})

    def _predict_batch_end(self, batch: int, logs: Mapping[str, Any]) -> None:
        self._emit("on_predict_batch_end", batch=batch, logs=logs)

    def _predict_end(self) -> None:
        self._emit("on_predict_end", logs={})
        self.mode = "train"

    # ---------------------------------------------------------------- run snapshots

    def _state_variables(self) -> dict[str, list[Any]]:
        """Every variable a run snapshot must hold, in a stable order, by group."""
        return self.run_state.variables()

    def _run_state(self) -> dict[str, Any]:
        """The JSON part of a run snapshot: position, LR controllers, plugin states."""
        return self.run_state.state()

    def _load_run_state(self, state: dict[str, Any]) -> None:
        self.run_state.load(state)


__all__ = ["RunContext", "LazyLogs", "GRADIENT_TAPS"]
