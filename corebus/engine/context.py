"""What every hook receives as ``trainer``: the run's state and the event dispatch.

Both the engine (:class:`corebus.Trainer`) and the Keras adapter (:class:`corebus.KerasCallback`)
drive plugins through the methods here, so a plugin sees the same arguments, the same order
and the same step numbers in ``Trainer.fit`` and in ``model.fit``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from corebus.bus.bus import PluginBus
from corebus.bus.logs import LazyLogs, LoggedStep
from corebus.delivery import sinks
from corebus.delivery.alerts import Alert
from corebus.engine.optimizer_chain import lr_owner

log = logging.getLogger("corebus")


#: What a plugin may ask the gradient pipeline for (``gradient_taps = {...}``); see
#: :class:`corebus.engine.gradients.GradientPipeline`.
GRADIENT_TAPS = ("norm", "values")


def optimizer_names(value: Any, owner: str) -> list[str] | None:
    """Validate a plugin's ``optimizers=`` argument: ``None`` (all), a name, or a list of names."""
    from corebus.errors import ConfigError

    names = [value] if isinstance(value, str) else (None if value is None else list(value))
    if names is not None and (not names or not all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"{owner} optimizers={value!r} must be None or a non-empty list of names")
    return names


_EVERY_CALL = object()


def _log_cadences(plugins: Any) -> tuple[Any, ...] | None:
    """The cadences of the batch records ``plugins`` use, or ``None`` (every call) when one of
    them does not declare ``batch_log_cadence``. Declared ``None``: none."""
    cadences = []
    for plugin in plugins:
        cadence = getattr(plugin, "batch_log_cadence", _EVERY_CALL)
        if cadence is _EVERY_CALL:
            return None
        if cadence is not None:
            cadences.append(cadence)
    return tuple(cadences)


def _takes_batch_records(bus: PluginBus) -> bool:
    """Whether some ``on_log`` / ``on_log_steps`` subscriber of ``bus`` takes batch records
    (declares a ``batch_log_cadence`` that is not ``None``, or none at all)."""
    plugins = [impl.plugin for hook in ("on_log", "on_log_steps") for _, impl in bus.implementations(hook)]
    cadences = _log_cadences(plugins)
    return cadences is None or len(cadences) > 0


#: ``on_log_steps`` records are handed over at least this often (bounds the tensors held).
HELD_STEPS_MAX = 1000


def _plain(value: Any) -> bool:
    """A config value worth logging as a run param: a scalar, or a list/tuple of scalars."""
    scalar = (int, float, str, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value))


def _constructor_parameters(cls: type) -> set[str]:
    import inspect

    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return set()
    return {
        name
        for name, p in signature.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"
    }


def _model_summary(context: Any) -> dict[str, Any]:
    """Loss, metrics and parameter counts of the run's model (names, not objects)."""
    model = context.model

    def names(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: names(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [names(v) for v in value]
        return (
            value
            if isinstance(value, str) or value is None
            else getattr(value, "name", getattr(value, "__name__", type(value).__name__))
        )

    config: dict[str, Any] = {}
    if getattr(model, "compiled", False):
        try:
            config = model.get_compile_config() or {}
        except Exception:  # a compile argument Keras cannot serialise: names below
            config = {}
    summary: dict[str, Any] = {
        "loss": names(config.get("loss") or getattr(model, "loss", None) or getattr(context, "loss", None)),
        "metrics": names(config.get("metrics") or getattr(context, "metrics", None) or []),
    }
    if getattr(model, "built", False) and model.weights:
        import numpy as np

        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        total = sum(int(np.prod(v.shape)) for v in model.weights)
        summary.update(total_params=total, trainable_params=trainable, non_trainable_params=total - trainable)
    return summary


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
    """

    #: Whether a run snapshot taken mid-epoch can be resumed at that exact batch (the engine
    #: can; ``model.fit`` restarts epochs from their first batch).
    supports_mid_epoch_resume = True

    def __init__(self) -> None:
        self.bus: PluginBus = PluginBus()
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
        self._callers: dict[str, Any] = {}
        self._batch_on_log: Any = None  # on_log for batch records: subscribers without on_log_steps
        self._batch_log_cadences: tuple[Any, ...] | None = None  # None: every train call is logged
        self._step_log_cadences: tuple[Any, ...] | None = ()  # of the on_log_steps subscribers
        self._held_steps: list[tuple[int, int, float, Any]] = []  # on_log_steps records to hand over
        self._hand_over_at = 0.0
        self._at_epoch_end = False
        self._resume_at: tuple[int, int] | None = None
        self.gradient_taps: frozenset[str] = frozenset()
        # where this process stands under tf.distribute (one process, one replica: 0, 1, 1, True)
        self.rank = 0
        self.num_workers = 1
        self.num_replicas = 1
        self.is_chief = True

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

    # ---------------------------------------------------------------- dispatch

    def _use_bus(self, bus: PluginBus, compiled_for: PluginBus | None = None) -> None:
        """Dispatch through ``bus``; gradient taps follow ``compiled_for`` (default ``bus``): under
        tf.distribute the chief's plugins decide what every worker's step computes."""
        from corebus.errors import ConfigError

        taps = {}
        for name, plugin in (compiled_for or bus).plugins.items():
            for tap in getattr(plugin, "gradient_taps", ()) or ():
                if tap not in GRADIENT_TAPS:
                    raise ConfigError(f"plugin {name!r}: gradient_taps has {tap!r}; use any of {GRADIENT_TAPS}")
                taps[tap] = name
        self.bus = bus
        self.gradient_taps = frozenset(taps)
        self._callers = {hook: bus.caller(hook) for hook in bus._callers}
        step_takers = [impl.plugin for _, impl in bus.implementations("on_log_steps")]
        self._batch_on_log = bus.caller_without("on_log", step_takers)
        self._batch_log_cadences = _log_cadences(
            impl.plugin for _, impl in bus.implementations("on_log") if impl.plugin not in step_takers
        )
        self._step_log_cadences = _log_cadences(step_takers)
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

            self._pipeline = GradientPipeline(self)
        return self._pipeline

    def accumulation_steps(self, optimizer_name: str = "default") -> int:
        """Micro-batches per optimizer update (the ``gradient_accumulation_steps`` hook)."""
        caller = self._callers.get("gradient_accumulation_steps")
        steps = caller(trainer=self, optimizer_name=optimizer_name) if caller is not None else None
        if steps is None:
            return 1
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {steps!r}")
        return steps

    def _emit(self, hook: str, **kwargs: Any) -> None:
        caller = self._callers.get(hook)
        if caller is not None:
            caller(trainer=self, **kwargs)

    def _train_begin(self) -> None:
        self.mode = "train"
        if self._held_steps:  # left by a model.fit that raised (Keras has no exception hook)
            self._hand_over_step_logs()
        self._hand_over_at = 0.0  # the first record goes at once
        self._emit("on_train_begin", logs={})

    def _epoch_begin(self, epoch: int) -> None:
        self._epoch_clock = (time.perf_counter(), self.global_step)
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
        log_now = self._batch_log_due(steps_done)
        hold = self._batch_log_due(steps_done, held=True)
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
        """Advance the steps, then ``on_train_batch_end`` (``logs``), then the batch records:
        ``held_values`` held for ``on_log_steps`` and, when ``log_values`` is given (a batch
        ``on_log`` is due), ``on_log`` (neither when ``on_train_batch_end`` raised)."""
        self.batch = batch
        self._advance(steps_done)
        on_batch_end = self._callers.get("on_train_batch_end")
        if on_batch_end is not None:
            self._unlogged_step = (held_values, log_values)  # a snapshot in the hook logs them first
            try:
                on_batch_end(trainer=self, batch=batch, logs=logs)
            finally:
                (held_values, log_values), self._unlogged_step = self._unlogged_step, None
        if held_values is not None:
            self._hold_step_log(held_values)
        if log_values is not None:
            self._batch_on_log(trainer=self, kind="batch", step=self.global_step, logs=log_values)

    def _batch_log_due(self, steps_done: int, held: bool = False) -> bool:
        """Whether the train call of ``steps_done`` batches that is ending gets a batch ``on_log``
        (``held``: an ``on_log_steps`` record): some subscriber's ``batch_log_cadence`` has a
        step in it (or one declares none)."""
        if held:
            caller, cadences = self._callers.get("on_log_steps"), self._step_log_cadences
        else:
            caller, cadences = self._batch_on_log, self._batch_log_cadences
        if caller is None:
            return False
        if cadences is None:
            return True
        step_after = self._global_step_at(self.micro_step + steps_done)
        for cadence in cadences:
            if cadence.due(self.global_step, step_after):
                return True
        return False

    def _hold_step_log(self, values: Any) -> None:
        """Keep the batch record of the call that just ended (steps advanced) for
        ``on_log_steps``; hand the records over when due."""
        held = self._held_steps
        held.append((self.global_step, self.previous_global_step, time.time(), values))
        if len(held) >= HELD_STEPS_MAX or time.monotonic() >= self._hand_over_at:
            self._hand_over_step_logs()

    def _hand_over_step_logs(self) -> None:
        """Give the ``on_log_steps`` subscribers the records held, if any."""
        held, self._held_steps = self._held_steps, []
        self._hand_over_at = time.monotonic() + sinks.LOGGER_FLUSH_SECONDS
        if held:
            self._callers["on_log_steps"](trainer=self, records=self._logged_steps(held))

    def _logged_steps(self, held: list[tuple[int, int, float, Any]]) -> list[LoggedStep]:
        """The held entries as records (the engine holds its calls' raw output: made lazy here)."""
        return [LoggedStep(*entry) for entry in held]

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

    def _epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self._hand_over_step_logs()  # a logger's batch points come before the epoch's
        self._at_epoch_end = True
        self._epoch_record = logs  # logged here, or earlier by a snapshot of the epoch end
        try:
            self._emit("on_epoch_end", epoch=epoch, logs=logs)
        except BaseException:
            self._epoch_record = None
            raise
        finally:
            self._at_epoch_end = False
        self._log_epoch_record()

    def _log_before_snapshot(self) -> None:
        """The records of the steps a snapshot holds reach the loggers before their
        ``state_dict()`` is taken (the step ending now, the held steps, the epoch ending now):
        a logger that makes what it got durable there logs each point once across a kill."""
        unlogged = getattr(self, "_unlogged_step", None)
        if unlogged is not None:
            self._unlogged_step = (None, None)
            held, values = unlogged
            if held is not None:
                self._hold_step_log(held)
            if values is not None:
                self._batch_on_log(trainer=self, kind="batch", step=self.global_step, logs=values)
        if self._held_steps:
            self._hand_over_step_logs()
        if self._at_epoch_end:
            self._log_epoch_record()

    def _log_epoch_record(self) -> None:
        logs, self._epoch_record = getattr(self, "_epoch_record", None), None
        if logs is not None and self._callers.get("on_log") is not None:
            record = dict(logs)
            for name in self.optimizers:
                key = self.learning_rate_key(name)
                if key not in record:
                    record[key] = self.lr_for(name).value
            started, step_at_start = getattr(self, "_epoch_clock", (None, 0))
            if started is not None and self.global_step > step_at_start:
                record["steps_per_second"] = (self.global_step - step_at_start) / (time.perf_counter() - started)
            self._emit("on_log", kind="epoch", step=self.global_step, logs=record)

    def _train_end(self, logs: dict[str, float] | None) -> None:
        self._hand_over_step_logs()
        self._emit("on_train_end", logs=logs)

    def _exception(self, exception: BaseException) -> None:
        try:  # the records of the steps trained still reach the loggers, which then close
            self._hand_over_step_logs()
        except Exception as exc:  # never hide the exception that ended training
            log.warning(
                "on_log_steps failed while training ended with %s: %s: %s",
                type(exception).__name__,
                type(exc).__name__,
                exc,
            )
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

    def transform_gradients(self, gradients: list, variables: list, optimizer_name: str = "default") -> list:
        """Run the gradient pipeline (trace time, inside the compiled step)."""
        if self.bus.caller("transform_gradients") is None:
            return list(gradients)
        return self.bus.chain(
            "transform_gradients",
            "gradients",
            list(gradients),
            trainer=self,
            variables=list(variables),
            optimizer_name=optimizer_name,
        )

    def run_params(self) -> dict[str, Any]:
        """What loggers record as run parameters: configuration only (the fit arguments, each
        optimizer's config, each plugin's constructor arguments or ``get_config()``, and the
        model's loss, metrics and parameter counts, as ``mlflow.tensorflow.autolog`` logs
        them), JSON-safe, with secret-looking values redacted. A plugin's running state
        (``wait``, ``best``...) is not configuration and stays out."""
        from corebus.delivery.sinks import redact

        def jsonable(value: Any) -> Any:
            return json.loads(json.dumps(value, default=str))

        plugins = {}
        for name, plugin in self.bus.plugins.items():
            if callable(getattr(plugin, "get_config", None)):
                config = plugin.get_config()
            else:
                accepted = _constructor_parameters(type(plugin))
                config = {k: v for k, v in vars(plugin).items() if k in accepted and _plain(v)}
            plugins[name] = jsonable(config)
        optimizer = {name: jsonable(opt.get_config()) for name, opt in self.optimizers.items()}
        return redact(
            {
                "fit": jsonable(self.params),
                "optimizer": optimizer,
                "plugins": plugins,
                "model": jsonable(_model_summary(self)),
            }
        )

    # ---------------------------------------------------------------- run snapshots

    def _state_variables(self) -> dict[str, list[Any]]:
        """Every variable a run snapshot must hold, in a stable order, by group."""
        from corebus.engine.lr import ScaledSchedule

        groups: dict[str, list[Any]] = {"model": list(self.model.variables)}
        for name in sorted(self.optimizers):
            optimizer = self.optimizers[name]
            groups[f"optimizer.{name}"] = list(optimizer.variables)
            learning_rate = lr_owner(optimizer)._learning_rate
            if isinstance(learning_rate, ScaledSchedule):
                groups[f"optimizer.{name}"].append(learning_rate.multiplier)
        groups["metrics"] = [v for metric in self.model.metrics for v in metric.variables]
        groups["gradient_pipeline"] = self.gradient_pipeline.state_variables()
        return groups

    def _run_state(self) -> dict[str, Any]:
        """The JSON part of a run snapshot: position, LR controllers, plugin states."""
        self._log_before_snapshot()
        epoch, next_batch = (self.epoch + 1, 0) if self._at_epoch_end else (self.epoch, self.batch + 1)
        return {
            "micro_step": self.micro_step,
            "global_step": self.global_step,
            "epoch": epoch,
            "next_batch": next_batch,
            "stop_training": self.stop_training,
            "lr": {name: self.lr_for(name).state_dict() for name in sorted(self.optimizers)},
            "plugins": self.bus.state_dict(),
        }

    def _load_run_state(self, state: dict[str, Any]) -> None:
        self._start_steps(int(state["micro_step"]))
        for name, lr_state in state.get("lr", {}).items():
            if name in self.optimizers:
                self.lr_for(name).load_state_dict(lr_state)
        self.bus.load_state_dict(state.get("plugins", {}))
        self.epoch = int(state["epoch"])
        self.stop_training = bool(state.get("stop_training", False))
        self._resume_at = (int(state["epoch"]), int(state["next_batch"]))
        self._emit("on_state_restored", step=self.global_step, state=state)


__all__ = ["RunContext", "LazyLogs"]
