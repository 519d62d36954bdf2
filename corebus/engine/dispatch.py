"""Event dispatch for one run: the cached hook callers, batch-record cadence and held steps.

A :class:`Dispatch` is owned by a :class:`corebus.RunContext` and passes it to every hook as
``trainer``. It decides which batch records are due (each subscriber's ``batch_log_cadence``),
holds ``on_log_steps`` records and hands them over in bulk, and logs the epoch record; the
plugins' error policy lives in the bus's callers it caches. The gradient pipeline reaches the
plugins' gradient hooks through it too (it holds the bus, not the run context).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from corebus.bus.bus import PluginBus
from corebus.bus.logs import LoggedStep
from corebus.delivery import sinks

log = logging.getLogger("corebus")

#: What a plugin may ask the gradient pipeline for (``gradient_taps = {...}``); see
#: :class:`corebus.engine.gradients.GradientPipeline`.
GRADIENT_TAPS = ("norm", "values")

#: ``on_log_steps`` records are handed over at least this often (bounds the tensors held).
HELD_STEPS_MAX = 1000

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


def takes_batch_records(bus: PluginBus) -> bool:
    """Whether some ``on_log`` / ``on_log_steps`` subscriber of ``bus`` takes batch records
    (declares a ``batch_log_cadence`` that is not ``None``, or none at all)."""
    plugins = [impl.plugin for hook in ("on_log", "on_log_steps") for _, impl in bus.implementations(hook)]
    cadences = _log_cadences(plugins)
    return cadences is None or len(cadences) > 0


def _records(held: list[tuple[int, int, float, Any]]) -> list[LoggedStep]:
    return [LoggedStep(*entry) for entry in held]


class Dispatch:
    """Calls the plugins of one run, with ``context`` as ``trainer``.

    ``make_records`` turns held ``(step, previous step, time, values)`` entries into the
    :class:`corebus.LoggedStep` records ``on_log_steps`` gets (the engine holds its calls'
    raw packed output and makes it lazy there).
    """

    def __init__(self, context: Any) -> None:
        self.context = context
        self.bus: PluginBus = PluginBus()
        self.gradient_taps: frozenset[str] = frozenset()
        self.callers: dict[str, Any] = {}
        self.batch_on_log: Any = None  # on_log for batch records: subscribers without on_log_steps
        self._batch_log_cadences: tuple[Any, ...] | None = None  # None: every train call is logged
        self._step_log_cadences: tuple[Any, ...] | None = ()  # of the on_log_steps subscribers
        self.held: list[tuple[int, int, float, Any]] = []  # on_log_steps records to hand over
        self.hand_over_at = 0.0
        self.make_records: Callable[[list[tuple[int, int, float, Any]]], list[LoggedStep]] = _records
        self.unlogged_step: tuple[Any, Any] | None = None  # (held, on_log values) of the step ending
        self._epoch_record: dict[str, Any] | None = None
        self.epoch_clock: tuple[float | None, int] = (None, 0)

    def use(self, bus: PluginBus, compiled_for: PluginBus | None = None) -> None:
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
        self.callers = {hook: bus.caller(hook) for hook in bus._callers}
        step_takers = [impl.plugin for _, impl in bus.implementations("on_log_steps")]
        self.batch_on_log = bus.caller_without("on_log", step_takers)
        self._batch_log_cadences = _log_cadences(
            impl.plugin for _, impl in bus.implementations("on_log") if impl.plugin not in step_takers
        )
        self._step_log_cadences = _log_cadences(step_takers)

    def emit(self, hook: str, **kwargs: Any) -> None:
        caller = self.callers.get(hook)
        if caller is not None:
            caller(trainer=self.context, **kwargs)

    # ---------------------------------------------------------------- gradient hooks

    def accumulation_steps(self, optimizer_name: str = "default") -> int:
        """Micro-batches per optimizer update (the ``gradient_accumulation_steps`` hook)."""
        caller = self.callers.get("gradient_accumulation_steps")
        steps = caller(trainer=self.context, optimizer_name=optimizer_name) if caller is not None else None
        if steps is None:
            return 1
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {steps!r}")
        return steps

    def transform_gradients(self, gradients: list, variables: list, optimizer_name: str = "default") -> list:
        """Run the ``transform_gradients`` chain (trace time, inside the compiled step)."""
        if self.bus.caller("transform_gradients") is None:
            return list(gradients)
        return self.bus.chain(
            "transform_gradients",
            "gradients",
            list(gradients),
            trainer=self.context,
            variables=list(variables),
            optimizer_name=optimizer_name,
        )

    # ---------------------------------------------------------------- batch records

    def batch_log_due(self, steps_done: int, held: bool = False) -> bool:
        """Whether the train call of ``steps_done`` batches that is ending gets a batch ``on_log``
        (``held``: an ``on_log_steps`` record): some subscriber's ``batch_log_cadence`` has a
        step in it (or one declares none)."""
        if held:
            caller, cadences = self.callers.get("on_log_steps"), self._step_log_cadences
        else:
            caller, cadences = self.batch_on_log, self._batch_log_cadences
        if caller is None:
            return False
        if cadences is None:
            return True
        context = self.context
        step_after = context._global_step_at(context.micro_step + steps_done)
        for cadence in cadences:
            if cadence.due(context.global_step, step_after):
                return True
        return False

    def batch_ended(self, batch: int, logs: Any, log_values: Any, held_values: Any) -> None:
        """``on_train_batch_end`` (``logs``; steps already advanced), then the batch records:
        ``held_values`` held for ``on_log_steps`` and, when ``log_values`` is given (a batch
        ``on_log`` is due), ``on_log`` (neither when ``on_train_batch_end`` raised)."""
        on_batch_end = self.callers.get("on_train_batch_end")
        if on_batch_end is not None:
            self.unlogged_step = (held_values, log_values)  # a snapshot in the hook logs them first
            try:
                on_batch_end(trainer=self.context, batch=batch, logs=logs)
            finally:
                (held_values, log_values), self.unlogged_step = self.unlogged_step, None
        if held_values is not None:
            self.hold(held_values)
        if log_values is not None:
            self.batch_on_log(trainer=self.context, kind="batch", step=self.context.global_step, logs=log_values)

    def hold(self, values: Any) -> None:
        """Keep the batch record of the call that just ended (steps advanced) for
        ``on_log_steps``; hand the records over when due."""
        context = self.context
        self.held.append((context.global_step, context.previous_global_step, time.time(), values))
        if len(self.held) >= HELD_STEPS_MAX or time.monotonic() >= self.hand_over_at:
            self.hand_over()

    def hand_over(self) -> None:
        """Give the ``on_log_steps`` subscribers the records held, if any."""
        held, self.held = self.held, []
        self.hand_over_at = time.monotonic() + sinks.LOGGER_FLUSH_SECONDS
        if held:
            self.callers["on_log_steps"](trainer=self.context, records=self.make_records(held))

    def hand_over_on_exception(self, exception: BaseException) -> None:
        """The records of the steps trained still reach the loggers, which then close; a
        failure here never hides the exception that ended training."""
        try:
            self.hand_over()
        except Exception as exc:
            log.warning(
                "on_log_steps failed while training ended with %s: %s: %s",
                type(exception).__name__,
                type(exc).__name__,
                exc,
            )

    def log_before_snapshot(self) -> None:
        """The records of the steps a snapshot holds reach the loggers before their
        ``state_dict()`` is taken (the step ending now, the held steps, the epoch ending now):
        a logger that makes what it got durable there logs each point once across a kill."""
        unlogged = self.unlogged_step
        if unlogged is not None:
            self.unlogged_step = (None, None)
            held, values = unlogged
            if held is not None:
                self.hold(held)
            if values is not None:
                self.batch_on_log(trainer=self.context, kind="batch", step=self.context.global_step, logs=values)
        if self.held:
            self.hand_over()
        self.log_epoch_record()  # only while on_epoch_end runs is there one

    # ---------------------------------------------------------------- epoch records

    def epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        """``on_epoch_end``; its ``on_log`` record is held for :meth:`log_epoch_record` (or a
        snapshot taken in the hook, which logs it first)."""
        self._epoch_record = logs
        try:
            self.emit("on_epoch_end", epoch=epoch, logs=logs)
        except BaseException:
            self._epoch_record = None
            raise

    def log_epoch_record(self) -> None:
        logs, self._epoch_record = self._epoch_record, None
        if logs is None or self.callers.get("on_log") is None:
            return
        context = self.context
        record = dict(logs)
        for name in context.optimizers:
            key = context.learning_rate_key(name)
            if key not in record:
                record[key] = context.lr_for(name).value
        started, step_at_start = self.epoch_clock
        if started is not None and context.global_step > step_at_start:
            record["steps_per_second"] = (context.global_step - step_at_start) / (time.perf_counter() - started)
        self.emit("on_log", kind="epoch", step=context.global_step, logs=record)
