"""Run corebus plugins inside ``model.fit`` / ``evaluate`` / ``predict``.

The same plugin instances, the same hook arguments and order, the same stop and learning-rate
semantics as in :class:`corebus.Trainer`: the adapter translates Keras callback calls into the
shared dispatch of :class:`corebus.RunContext`.
"""

from __future__ import annotations

from typing import Any

import keras

from . import registry
from .bus import PluginBus
from .context import RunContext
from .gradients import GradientPipelineOptimizer, unwrap
from .logs import LazyLogs


class KerasRunContext(RunContext):
    """What plugins see as ``trainer`` inside ``model.fit``."""

    supports_mid_epoch_resume = False

    def __init__(self) -> None:
        super().__init__()
        self._first_batch = 0

    @property
    def stop_training(self) -> bool:
        return bool(getattr(self.model, "stop_training", False))

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        if self.model is not None:
            self.model.stop_training = bool(value)

    def _state_variables(self) -> dict[str, list[Any]]:
        # Resume in model.fit is per epoch and Keras resets metrics at every epoch start (its
        # compiled metrics are not even built yet when a snapshot is restored): leave them out.
        groups = super()._state_variables()
        groups.pop("metrics", None)
        return groups

    def _attach(self, model: Any, params: dict[str, Any]) -> None:
        self.model = model
        optimizer = getattr(model, "optimizer", None)
        self.optimizers = {"default": unwrap(optimizer)} if optimizer is not None else {}
        self.params = dict(params or {})


class KerasCallback(keras.callbacks.Callback):
    """A Keras callback that drives corebus plugins.

    ::

        callback = corebus.KerasCallback(plugins=["early_stopping", MyPlugin()])
        model.compile(optimizer=callback.wrap_optimizer("adam"), loss=...)  # gradient plugins
        model.fit(x, y, callbacks=[callback])
    """

    def __init__(self, plugins: Any = None, *, profile: bool = False):
        super().__init__()
        self._pipelined = False
        self.context = KerasRunContext()
        self.context._use_bus(PluginBus(registry.resolve_all(plugins), profile=profile))

    @property
    def bus(self) -> PluginBus:
        return self.context.bus

    def wrap_optimizer(self, optimizer: Any) -> GradientPipelineOptimizer:
        """Wrap ``optimizer`` so this callback's gradient plugins run inside ``model.fit``."""
        return GradientPipelineOptimizer(optimizer, self.context)

    # --------------------------------------------------------------- train

    def on_train_begin(self, logs=None):
        ctx = self.context
        ctx._attach(self.model, self.params)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            # Build before any plugin runs, so a run snapshot can be restored into the slots.
            optimizer.build(self.model.trainable_variables)
        if ctx.optimizer is not None:
            ctx.gradient_pipeline.prepare(ctx.optimizer, self.model.trainable_variables)
        # Gradient taps only measure something when the optimizer runs the pipeline.
        wrapped = getattr(self.model, "optimizer", None)
        while wrapped is not None and not isinstance(wrapped, GradientPipelineOptimizer):
            wrapped = getattr(wrapped, "inner_optimizer", None)
        self._pipelined = wrapped is not None
        iterations = ctx.optimizer.iterations if ctx.optimizer is not None else 0
        ctx._start_steps(int(keras.ops.convert_to_numpy(iterations)) * ctx._accumulation)
        ctx._train_begin()
        if ctx._resume_at is not None:
            # A plugin restored a run snapshot. Keras's fit reads `_initial_epoch` right after
            # on_train_begin (the hook its own BackupAndRestore uses): epoch granularity only.
            epoch, _ = ctx._resume_at
            ctx._resume_at = None
            self.model._initial_epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.context._epoch_begin(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self.context._first_batch = batch
        self.context._train_batch_begin(batch)

    def on_train_batch_end(self, batch, logs=None):
        ctx = self.context
        # Keras reports begin + N - 1 even for a short last call of an epoch; clamp to the
        # real last batch so step counts (and every cadence built on them) stay exact.
        steps = ctx.params.get("steps")
        if steps:
            batch = min(batch, steps - 1)
        steps_done = batch - ctx._first_batch + 1
        logs = dict(logs or {})
        if not (ctx._batch_log_due(steps_done) or ctx._batch_log_due(steps_done, held=True)):
            ctx._train_batch_end(batch, steps_done, LazyLogs.from_tensors(logs))
            return
        # Keras hands callbacks running means only; on_log's gradient norm and learning rate
        # (as the engine reports them) join the same fetch, read now: they change next step.
        norms = ctx.gradient_pipeline.norm_logs() if "norm" in ctx.gradient_taps and self._pipelined else {}
        step_values = LazyLogs.from_tensors({**logs, **norms, **ctx.learning_rate_logs()})
        names = list(logs)
        ctx._train_batch_end(batch, steps_done, step_values.view(names, range(len(names))), step_values)

    def on_epoch_end(self, epoch, logs=None):
        self.context._epoch_end(epoch, logs if logs is not None else {})

    def on_train_end(self, logs=None):
        self.context._train_end(logs)

    # --------------------------------------------------------------- evaluate

    def on_test_begin(self, logs=None):
        ctx = self.context
        if ctx.model is None:
            ctx._attach(self.model, self.params)
        ctx._test_begin()

    def on_test_batch_begin(self, batch, logs=None):
        self.context._test_batch_begin(batch)

    def on_test_batch_end(self, batch, logs=None):
        self.context._test_batch_end(batch, LazyLogs.from_tensors(logs or {}))

    def on_test_end(self, logs=None):
        self.context._test_end(logs if logs is not None else {})

    # --------------------------------------------------------------- predict

    def on_predict_begin(self, logs=None):
        ctx = self.context
        if ctx.model is None:
            ctx._attach(self.model, self.params)
        ctx._predict_begin()

    def on_predict_batch_begin(self, batch, logs=None):
        self.context._predict_batch_begin(batch)

    def on_predict_batch_end(self, batch, logs=None):
        self.context._predict_batch_end(batch, logs or {})

    def on_predict_end(self, logs=None):
        self.context._predict_end()
