"""The compiled step: the train / test / predict ``tf.function``s the engine calls.

:class:`CompiledStep` traces one step (the default Keras step, the model's own, or a custom
``train_step``), runs ``steps_per_execution`` of them per call (optionally under XLA and a
``tf.distribute`` strategy), packs every reported value into one float32 vector, and counts
the steps run in a variable (a run snapshot holds it). It caches one function per shape of
call and retraces when what is compiled into the step changes (gradient plugins, the LR).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from corebus.engine.data import ArrayData, DatasetData
from corebus.engine.optimizer_chain import lr_owner
from corebus.engine.packed_logs import STEP_VALUE
from corebus.errors import ConfigError


def _unscale_for_distribution(loss):
    # Keras's own helper (identity without a strategy); private, so degrade gracefully.
    try:
        from keras.src.losses.loss import unscale_loss_for_distribution
    except ImportError:  # pragma: no cover - depends on the Keras version
        return loss
    return unscale_loss_for_distribution(loss)


def _pack(logs: Mapping[str, Any], names_out: list[str]) -> tf.Tensor:
    """Pack every reported scalar into one float32 vector (one host fetch later).

    Runs at trace time; the names are recorded as a side effect, in the same order.
    """
    # Sorted, because Keras hands callbacks sorted logs (pythonify_logs).
    names_out[:] = sorted(logs.keys())
    if not names_out:
        return tf.zeros((0,), tf.float32)
    return tf.stack([_scalar(logs[k]) for k in names_out])


def _scalar(value: Any) -> tf.Tensor:
    """A float32 scalar: a metric's mean if it is not one already (no op added for a scalar)."""
    value = tf.cast(value, tf.float32)
    return value if value.shape.rank == 0 else tf.reduce_mean(value)


class CompiledStep:
    """The compiled functions of one :class:`corebus.Trainer` (``trainer``: the model, its
    optimizers, strategy, custom steps and gradient pipeline)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        with tf.init_scope():
            self.step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="micro_step")
        self._train_fn: dict[Any, Callable] = {}
        self._test_fn: dict[Any, Callable] = {}
        self._predict_fn: Callable | None = None
        self.train_log_names: list[str] = []  # of the current train trace, filled at trace time
        self.test_log_names: list[str] = []
        #: whether the step packs each step's own values for on_log (only when some subscriber
        #: takes batch records)
        self.step_values = False
        #: what of the plugins is compiled into the step (gradient hooks, taps): a change retraces
        self.gradient_signature: tuple = ()
        self._results_fn: Any = None
        self._reset_fn: Any = None

    # ------------------------------------------------------------------ one step

    def _default_train_step(self, data: Any) -> Mapping[str, Any]:
        model = self.trainer.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            batch_loss = _unscale_for_distribution(loss)
            model._loss_tracker.update_state(
                batch_loss, sample_weight=tf.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0]
            )
            loss = model.optimizer.scale_loss(loss)
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.trainer.apply_gradients(gradients, variables)
        logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if self.step_values:  # the batch's own loss, for on_log: one more value in the packed vector
            logs = {**logs, STEP_VALUE + "loss": batch_loss}
        return logs

    def _default_test_step(self, data: Any) -> Mapping[str, Any]:
        model = self.trainer.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = model(x, training=False)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        model._loss_tracker.update_state(
            _unscale_for_distribution(loss),
            sample_weight=tf.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0],
        )
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _one_train_step(self, data: Any) -> Mapping[str, Any]:
        trainer = self.trainer
        if trainer._user_train_step is not None:
            logs = trainer._user_train_step(trainer, data)
        elif trainer._model_train_step:
            logs = trainer.model.train_step(data)
        else:
            logs = self._default_train_step(data)
        if trainer.strategy is None:  # (under a strategy the call counts steps, once per step)
            # Automatic control dependencies order ops per resource only: without this, the
            # counter could move before a get_next that then hits the end of the data.
            with tf.control_dependencies([t for t in keras.tree.flatten(data) if t is not None]):
                self.step_counter.assign_add(1)
        if not self.step_values:
            return logs
        # Read inside the step, they share the logs' one host fetch: an eager read after the
        # step costs a dispatch and a thread hand-off (a hundred-odd µs on a 2-core CPU).
        extras = {**trainer.gradient_pipeline.norm_logs(), **trainer.learning_rate_logs()}
        return {**logs, **{STEP_VALUE + key: value for key, value in extras.items()}}

    def _one_test_step(self, data: Any) -> Mapping[str, Any]:
        trainer = self.trainer
        if trainer._user_test_step is not None:
            return trainer._user_test_step(trainer, data)
        if trainer._model_test_step:
            return trainer.model.test_step(data)
        if trainer._user_train_step is not None and not trainer.model.compiled:
            raise ConfigError("evaluate with a custom train_step needs test_step=... as well")
        return self._default_test_step(data)

    # ------------------------------------------------------------------ compiled calls

    def _compiled(self, step: Callable, names: list[str], steps: int, take: Callable) -> Callable:
        """A ``tf.function`` running ``steps`` steps on an iterator, returning packed logs."""
        trainer = self.trainer
        one_step = step
        if trainer.jit_compile:
            one_step = tf.function(step, jit_compile=True, reduce_retracing=True)

        def on_rows(source, element):  # gathers this replica's rows inside the step
            return one_step(take(source, element))

        if trainer.strategy is not None:
            on_rows = self._distributed(on_rows, counts_steps=step == self._one_train_step)

        if steps == 1:

            def call(iterator, source):
                return _pack(on_rows(source, next(iterator)), names)

        else:

            def call(iterator, source):
                packed = _pack(on_rows(source, next(iterator)), names)
                for _ in tf.range(steps - 1):
                    packed = _pack(on_rows(source, next(iterator)), names)
                return packed

        return call if trainer.run_eagerly else tf.function(call)

    def _distributed(self, step: Callable, counts_steps: bool) -> Callable:
        """``step`` run on every replica; its logs reduced to one value each (replica mean)."""
        strategy, mean = self.trainer.strategy, tf.distribute.ReduceOp.MEAN

        def on_replica(source, element):
            return {k: tf.reduce_mean(tf.cast(v, tf.float32)) for k, v in step(source, element).items()}

        def run(source, element):
            logs = strategy.run(on_replica, args=(source, element))
            reduced = {k: strategy.reduce(mean, v, axis=None) for k, v in logs.items()}
            if counts_steps:
                with tf.control_dependencies(list(reduced.values())):
                    self.step_counter.assign_add(1)
            return reduced

        return run

    def train_function(self, steps: int, data: ArrayData | DatasetData) -> Callable:
        """The compiled call of ``steps`` train steps on ``data``'s iterator."""
        # The LR (a variable or a schedule) is read inside the compiled step: a schedule
        # installed after the last trace needs a new one.
        lr_signature = tuple(id(lr_owner(o)._learning_rate) for o in self.trainer.optimizers.values())
        key = (steps, type(data), self.gradient_signature, lr_signature, self.step_values)
        if key not in self._train_fn:
            self._train_fn[key] = self._compiled(self._one_train_step, self.train_log_names, steps, data.take)
        return self._train_fn[key]

    def test_function(self, steps: int, data: ArrayData | DatasetData) -> Callable:
        key = (steps, type(data))
        if key not in self._test_fn:
            self._test_fn[key] = self._compiled(self._one_test_step, self.test_log_names, steps, data.take)
        return self._test_fn[key]

    def predict_function(self) -> Callable:
        """The compiled call of one predict step: the model's outputs for the next batch."""
        if self._predict_fn is None:
            model = self.trainer.model

            def predict_call(iterator, source, take):
                x_batch, _, _ = keras.utils.unpack_x_y_sample_weight(take(source, next(iterator)))
                return model(x_batch, training=False)

            self._predict_fn = tf.function(predict_call)
        return self._predict_fn

    # ------------------------------------------------------------------ metrics

    def metrics_or(self, logs: Mapping[str, Any] | None) -> dict[str, float]:
        """Keras's rule: the model's metric results, unless a custom step reports other keys."""
        metric_logs = self.metric_results() if self.trainer.model.compiled else {}
        if logs is None or (metric_logs and set(logs) == set(metric_logs)):
            chosen = metric_logs
        else:
            chosen = logs
        return {k: float(np.asarray(v)) if np.ndim(v) == 0 else np.asarray(v) for k, v in sorted(dict(chosen).items())}

    def metric_results(self) -> dict[str, Any]:
        """``model.get_metrics_result()`` as one compiled call and one host fetch (eagerly it is
        a few small ops and a sync per metric, every epoch and every validation pass). A vector
        metric (``F1Score(average=None)``) stays a vector, as in Keras's logs."""
        if self._results_fn is None:
            shapes: list[tuple[str, tuple]] = []

            def results():
                values = self.trainer.model.get_metrics_result()
                shapes[:] = [(k, tuple(values[k].shape)) for k in sorted(values)]
                parts = [tf.reshape(tf.cast(values[k], tf.float32), [-1]) for k, _ in shapes]
                return tf.concat(parts, 0) if parts else tf.zeros((0,), tf.float32)

            self._results_fn = (tf.function(results), shapes)
        function, shapes = self._results_fn
        flat = np.asarray(function(), dtype=np.float64)
        out, at = {}, 0
        for name, shape in shapes:
            size = int(np.prod(shape)) if shape else 1
            out[name] = flat[at].item() if not shape else flat[at : at + size].reshape(shape).astype(np.float32)
            at += size
        return out

    def reset_metrics(self) -> None:
        # a custom step's own metrics (Trainer(metrics=...)) start every epoch afresh too; the
        # compiled reset follows the metrics' variables (compile metrics build in the first step)
        metrics = list(self.trainer.model.metrics) + list(getattr(self.trainer, "metrics", None) or [])
        key = tuple((id(m), len(m.variables)) for m in metrics)
        if self._reset_fn is None or self._reset_fn[0] != key:

            def reset():
                for metric in metrics:
                    metric.reset_state()
                return tf.constant(0)

            self._reset_fn = (key, tf.function(reset))
        self._reset_fn[1]()
