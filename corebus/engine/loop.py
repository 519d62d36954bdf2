"""The engine's loops: the epochs of ``fit``, the batches of an epoch, of ``evaluate`` and ``predict``.

:class:`EpochLoop` calls the compiled step once per ``steps_per_execution`` batches, advances
the run's steps, hands each call's logs to the run context's lifecycle (which dispatches the
hooks), answers stop requests at step boundaries and resumes mid-epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from corebus.bus.logs import LazyLogs
from corebus.engine.configure import should_validate
from corebus.engine.data import ArrayData, DatasetData
from corebus.engine.packed_logs import HeldCall, PackedLogs
from corebus.engine.step import CompiledStep
from corebus.errors import ConfigError

log = logging.getLogger("corebus")


class EpochLoop:
    """The loops of one :class:`corebus.Trainer` over its compiled step and packed-log layout."""

    def __init__(self, trainer: Any, step: CompiledStep, packed_logs: PackedLogs) -> None:
        self.trainer = trainer
        self.step = step
        self.packed_logs = packed_logs
        self.counter_at_epoch_start = 0  # the step counter's value when the epoch began
        self._any_fn: Any = None

    def fit_epochs(self, data: Any, val_data: Any, epochs: int, initial_epoch: int, validation_freq: Any) -> Any:
        trainer = self.trainer
        epoch_logs: dict[str, float] | None = None
        try:
            trainer._train_begin()
            # Keras's BackupAndRestore says where to start through model._initial_epoch.
            start_epoch, skip = getattr(trainer.model, "_initial_epoch", None) or initial_epoch, 0
            if trainer._resume_at is not None:  # a plugin restored a run snapshot
                (start_epoch, skip), trainer._resume_at = trainer._resume_at, None
                if isinstance(data, ArrayData):
                    data.seed = trainer.seed
            for epoch in range(start_epoch, epochs):
                if trainer.stop_training:  # the snapshot was taken after a plugin stopped the run
                    break
                if trainer._stops.received is not None and epoch > start_epoch:
                    trainer._at_epoch_end = True  # a snapshot now resumes at this epoch's start
                    raise trainer._stops.stop()
                if skip:
                    # Mid-epoch resume: metrics were restored and on_epoch_begin already ran
                    # before the interruption (repeating it could apply a per-epoch change twice).
                    trainer.epoch = epoch
                    self.counter_at_epoch_start = trainer.micro_step - skip
                else:
                    self.step.reset_metrics()
                    self.counter_at_epoch_start = trainer.micro_step
                    trainer._epoch_begin(epoch)
                last = self.run_epoch(data, epoch, skip)
                data.epoch_done()
                if (
                    last is None
                    and epoch == start_epoch
                    and not skip
                    and trainer.micro_step == self.counter_at_epoch_start
                ):
                    raise ConfigError("the first epoch got no batches: the training data is empty")
                skip = 0
                epoch_logs = self.step.metrics_or(last)
                self._watch_loss(epoch, epoch_logs)
                if val_data is not None and should_validate(epoch, validation_freq):
                    val_logs = self.evaluate_data(val_data)
                    epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
                    epoch_logs = dict(sorted(epoch_logs.items()))
                trainer._epoch_end(epoch, epoch_logs)
                self._agree_to_stop()
                if trainer.stop_training:
                    break
            for optimizer in trainer.optimizers.values():
                optimizer.finalize_variable_values(trainer.model.trainable_variables)
            trainer._train_end(epoch_logs)
        except BaseException as exc:
            data.epoch_done()
            trainer._exception(exc)
            raise
        finally:
            if hasattr(trainer.model, "_initial_epoch"):
                trainer.model._initial_epoch = None
        return trainer.history

    def _watch_loss(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """One warning when the loss stops being finite (a run that goes on after NaN is not
        silently "finished"); ``trainer.loss_not_finite`` tells the report and loggers."""
        trainer = self.trainer
        loss = logs.get("loss")
        if trainer.loss_not_finite is not None or not isinstance(loss, float) or np.isfinite(loss):
            return
        trainer.loss_not_finite = (epoch, self.counter_at_epoch_start + 1, trainer.micro_step)
        log.warning(
            "the loss is %s at the end of epoch %d (it turned non-finite between steps %d and %d); "
            "training goes on: add the terminate_on_nan plugin (or keras.callbacks.TerminateOnNaN) "
            "to stop at the first such step",
            loss,
            epoch + 1,
            *trainer.loss_not_finite[1:],
        )

    def _agree_to_stop(self) -> None:
        """Stop every worker if any worker's plugins decided to stop, or any got a stop signal
        (a collective at the epoch end: all workers call it, so they stop at one agreed step)."""
        trainer = self.trainer
        if trainer.num_workers <= 1:
            return
        if self._any_fn is None:
            strategy = trainer.strategy

            def any_worker(flags):
                votes = strategy.run(lambda: tf.identity(flags))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)  # votes per flag

            self._any_fn = tf.function(any_worker)
        signalled = trainer._stops.received
        votes = self._any_fn(tf.constant([1.0 if trainer.stop_training else 0.0, float(signalled or 0)])).numpy()
        trainer.stop_training = bool(votes[0] > 0)
        if votes[1] > 0 and signalled is None:  # another worker was signalled: stop with it
            import signal

            trainer._stops.received = int(signal.SIGTERM)

    def _batches(self, steps: int | None, begin: int = 0) -> Any:
        """``(first batch index, number of steps)`` per compiled call of one epoch."""
        spe = self.trainer.steps_per_execution
        while steps is None or begin < steps:
            n = spe if steps is None else min(spe, steps - begin)
            yield begin, n
            begin += n

    def run_epoch(self, data: ArrayData | DatasetData, epoch: int, first_batch: int = 0) -> Mapping[str, Any] | None:
        trainer = self.trainer
        begin_hook = trainer.dispatch.callers["on_train_batch_begin"]
        batch_end_hook = trainer.dispatch.callers["on_train_batch_end"] is not None
        per_call_logs = batch_end_hook or trainer.dispatch.batch_on_log is not None
        holds = trainer.dispatch.callers["on_log_steps"] is not None
        # A call's own value of a running mean follows from the rows each call covered (below).
        rows = data if isinstance(data, ArrayData) and not data.has_sample_weight else None
        iterator = data.iterator(epoch, skip_batches=first_batch)
        source = data.source
        self.packed_logs.new_epoch()  # metrics were reset (or restored mid-epoch): no call before
        last_call = None  # (packed, end batch, layout) of the call before, for held records
        packed = None
        functions: dict[int, Callable] = {}  # looked up once per epoch, not once per call
        for begin, n in self._batches(data.steps_in(epoch), first_batch):
            if begin_hook is not None:
                trainer.batch = begin
                begin_hook(trainer=trainer, batch=begin, logs={})
            try:
                function = functions.get(n) or functions.setdefault(n, self.step.train_function(n, data))
                packed = function(iterator, source)
            except tf.errors.OutOfRangeError:
                done = self._steps_done_since(begin)
                if isinstance(data, DatasetData):
                    data.exhausted()
                if done:
                    logs = self.step.metrics_or(None) or {}
                    # The cut-short call packed nothing: on_log's learning rate is read here (if due).
                    due = trainer.dispatch.batch_log_due(done) or trainer.dispatch.batch_log_due(done, held=True)
                    step_values = (
                        None
                        if not due
                        else {
                            **logs,
                            **{key: float(np.asarray(rate)) for key, rate in trainer.learning_rate_logs().items()},
                        }
                    )
                    trainer._train_batch_end(begin + done - 1, done, logs, step_values)
                    return logs
                break
            if not trainer.model.built:
                # A custom step that calls only parts of the model (a GAN's two halves) built
                # every layer without Keras marking the whole model built; saving needs it.
                trainer.model.built = all(layer.built for layer in trainer.model._flatten_layers(include_self=False))
            hold = holds and trainer.dispatch.batch_log_due(n, held=True)
            if per_call_logs:
                log_now = trainer.dispatch.batch_log_due(n)
                logs, step_values = self.packed_logs.call_logs(packed, rows, begin, n, batch_end_hook, log_now or hold)
                trainer._batch_ended(
                    begin + n - 1, n, logs, step_values if log_now else None, step_values if hold else None
                )
            else:
                trainer._advance(n)
                if holds:  # on_log_steps subscribers only: a call's record is made at hand-over
                    layout = self.packed_logs.layout()
                    if hold:
                        trainer.dispatch.hold(HeldCall(packed, last_call, begin, n, rows, layout))
                    last_call = (packed, begin + n, layout)
            if trainer.stop_training:
                break
            stops = trainer._stops
            # Several workers agree on the stop at the epoch end instead (_agree_to_stop): a
            # step boundary chosen by one worker alone would leave the others in a collective.
            if (
                stops.received is not None
                and trainer.num_workers <= 1
                and trainer.micro_step % trainer._accumulation == 0
            ):
                raise stops.stop()
        if packed is None:
            return None
        return self.packed_logs.last_logs(packed)

    def _steps_done_since(self, begin: int) -> int:
        # A call that hit the end of a dataset of unknown length ran some of its steps:
        # the step counter variable tells how many.
        done = int(self.step.step_counter.numpy()) - self.counter_at_epoch_start - begin
        return max(done, 0)

    def evaluate_data(self, data: ArrayData | DatasetData) -> dict[str, float]:
        trainer = self.trainer
        data.reset()
        trainer._test_begin()
        self.step.reset_metrics()
        begin_hook = trainer.dispatch.callers["on_test_batch_begin"]
        end_hook = trainer.dispatch.callers["on_test_batch_end"]
        iterator = data.iterator(0)
        source = data.source
        logs: Mapping[str, Any] | None = None
        for begin, n in self._batches(data.steps):
            if begin_hook is not None:
                begin_hook(trainer=trainer, batch=begin, logs={})
            try:
                packed = self.step.test_function(n, data)(iterator, source)
            except tf.errors.OutOfRangeError:
                break
            logs = LazyLogs(self.step.test_log_names, packed)
            if end_hook is not None:
                end_hook(trainer=trainer, batch=begin + n - 1, logs=logs)
        data.epoch_done()
        result = self.step.metrics_or(logs)
        trainer._test_end(result)
        return result

    def predict(self, data: ArrayData | DatasetData) -> Any:
        """``model.predict``'s outputs for every sample of ``data``, with the predict hooks."""
        trainer = self.trainer
        function = self.step.predict_function()
        trainer._predict_begin()
        outputs = []
        iterator = data.iterator(0)
        begin, steps = 0, data.steps
        while steps is None or begin < steps:
            trainer._predict_batch_begin(begin)
            try:
                batch_out = function(iterator, data.source, data.take)
            except tf.errors.OutOfRangeError:
                break
            batch_out = keras.tree.map_structure(np.asarray, batch_out)
            outputs.append(batch_out)
            trainer._predict_batch_end(begin, {"outputs": batch_out})
            begin += 1
        data.epoch_done()
        trainer._predict_end()
        if not outputs:
            raise ConfigError("predict got no batches")
        return keras.tree.map_structure_up_to(outputs[0], lambda *parts: np.concatenate(parts), *outputs)
