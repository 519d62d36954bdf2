"""Run corebus plugins inside ``model.fit`` / ``evaluate`` / ``predict``.

The same plugin instances, the same hook arguments and order, the same stop and learning-rate
semantics as in :class:`corebus.Trainer`: the adapter translates Keras callback calls into the
shared lifecycle of :class:`corebus.RunContext`.
"""

from __future__ import annotations

from typing import Any

import keras

from corebus.bus import registry
from corebus.bus.bus import PluginBus
from corebus.bus.logs import LazyLogs
from corebus.engine.context import RunContext
from corebus.engine.gradients import GradientPipelineOptimizer, unwrap, wrap_optimizer
from corebus.engine.optimizer_chain import optimizer_chain
from corebus.engine.run_state import RunState
from corebus.errors import ConfigError, CorebusError

#: Hooks compiled into the step through the gradient pipeline.
GRADIENT_HOOKS = ("transform_gradients", "gradient_accumulation_steps")


class KerasRunContext(RunContext):
    """What plugins see as ``trainer`` inside ``model.fit``."""

    supports_mid_epoch_resume = False

    def __init__(self) -> None:
        super().__init__()
        self._first_batch = 0
        # Resume in model.fit is per epoch and Keras resets metrics at every epoch start (its
        # compiled metrics are not even built yet when a snapshot is restored): leave them out.
        self.run_state = RunState(self, metrics=False)

    @property
    def stop_training(self) -> bool:
        return bool(getattr(self.model, "stop_training", False))

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        if self.model is not None:
            self.model.stop_training = bool(value)

    def _attach(self, model: Any, params: dict[str, Any]) -> None:
        self.model = model
        optimizer = getattr(model, "optimizer", None)
        self.optimizers = {"default": unwrap(optimizer)} if optimizer is not None else {}
        self.params = dict(params or {})


class KerasCallback(keras.callbacks.Callback):
    """A Keras callback that drives corebus plugins.

    ::

        callback = corebus.KerasCallback(plugins=["early_stopping", "gradient_clipping", MyPlugin()])
        model.compile(optimizer="adam", loss=...)
        model.fit(x, y, callbacks=[callback])

    Gradient plugins (clipping, accumulation, gradient taps) run inside Keras's compiled step:
    for the length of each ``fit`` the callback wraps the model's optimizer in a
    :class:`corebus.GradientPipelineOptimizer` (Keras's ``LossScaleOptimizer`` pattern) and
    retraces the train function; at the end it puts the model's own optimizer back, so the
    model (and any file saved from it) never depends on corebus.
    """

    def __init__(self, plugins: Any = None, *, profile: bool = False):
        super().__init__()
        self._pipelined: GradientPipelineOptimizer | None = None  # the wrapper in use during fit
        self._checked = False
        self._own_optimizer: Any = None  # the model's optimizer while ours wraps it
        self.context = KerasRunContext()
        self.context._use_bus(PluginBus(registry.resolve_all(plugins), profile=profile))

    @property
    def bus(self) -> PluginBus:
        return self.context.bus

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """The plain Keras optimizer for ``optimizer``: no longer needed (the callback wraps the
        model's optimizer during ``fit``), kept so older scripts run unchanged."""
        return wrap_optimizer(optimizer)

    def _install_pipeline(self) -> None:
        """Route the model's updates through the gradient pipeline when a plugin needs it."""
        model, bus = self.model, self.context.bus
        optimizer = getattr(model, "optimizer", None)
        needed = bool(self.context.gradient_taps) or any(bus.implementations(h) for h in GRADIENT_HOOKS)
        self._pipelined = None
        if optimizer is None or not needed:
            return
        # a GradientPipelineOptimizer inside the user's wrappers (a LossScaleOptimizer's inner one)
        nested = next(
            (o for o in list(optimizer_chain(optimizer))[1:] if isinstance(o, GradientPipelineOptimizer)), None
        )
        if nested is not None and nested._context is not self.context:
            raise ConfigError(
                f"the model's optimizer ({type(optimizer).__name__}) holds a GradientPipelineOptimizer of another "
                "run: compile the model with a plain optimizer (KerasCallback wraps it during fit)"
            )
        if nested is None:
            if not (isinstance(optimizer, GradientPipelineOptimizer) and optimizer._context is self.context):
                self._own_optimizer = optimizer
                with model.distribute_strategy.scope():  # its variables live where the model's do
                    model.optimizer = GradientPipelineOptimizer(unwrap(optimizer), self.context)
                # fit made its train function before on_train_begin; traced or not, it must
                # trace again to see the wrapper.
                model.make_train_function(force=True)
            nested = model.optimizer
        self._pipelined = nested

    def _check_pipeline_reached(self) -> None:
        """After the first step: gradient plugins must not be silently inert."""
        if self._pipelined is not None and not self._pipelined.traced:
            wanted = sorted({name for hook in GRADIENT_HOOKS for name, _ in self.context.bus.implementations(hook)})
            taps = sorted(self.context.gradient_taps)
            self._remove_pipeline()
            raise CorebusError(
                f"gradient plugins {wanted} / gradient_taps={set(taps) or '{}'} cannot run: the model's train_step "
                "applied no gradients through model.optimizer (call self.optimizer.apply(grads, variables) in it)"
            )

    def _remove_pipeline(self) -> None:
        if self._own_optimizer is not None:
            self.model.optimizer, self._own_optimizer = self._own_optimizer, None
            # The pipeline's hooks are compiled into the trace: a later fit traces anew.
            self.model.make_train_function(force=True)

    # --------------------------------------------------------------- train

    def on_train_begin(self, logs=None):
        ctx = self.context
        self._install_pipeline()
        self._checked = False
        ctx._attach(self.model, self.params)
        optimizer = getattr(self.model, "optimizer", None)
        # Without a distribution strategy Keras builds the model at the first step: a model
        # with no input shape has no variables yet, and the optimizer and the pipeline then
        # build themselves in that first trace.
        if optimizer is not None and self.model.built:
            with self.model.distribute_strategy.scope():
                if not optimizer.built:
                    # Build before any plugin runs, so a run snapshot can be restored into the slots.
                    optimizer.build(self.model.trainable_variables)
                ctx.gradient_pipeline.prepare(ctx.optimizer, self.model.trainable_variables)
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
        if not self._checked:
            self._checked = True
            self._check_pipeline_reached()
        # Keras reports begin + N - 1 even for a short last call of an epoch; clamp to the
        # real last batch so step counts (and every cadence built on them) stay exact.
        steps = ctx.params.get("steps")
        if steps:
            batch = min(batch, steps - 1)
        steps_done = batch - ctx._first_batch + 1
        logs = dict(logs or {})
        if not (ctx.dispatch.batch_log_due(steps_done) or ctx.dispatch.batch_log_due(steps_done, held=True)):
            ctx._train_batch_end(batch, steps_done, LazyLogs.from_tensors(logs))
            return
        # Keras hands callbacks running means only; on_log's gradient norm and learning rate
        # (as the engine reports them) join the same fetch, read now: they change next step.
        norms = ctx.gradient_pipeline.norm_logs() if "norm" in ctx.gradient_taps else {}
        step_values = LazyLogs.from_tensors({**logs, **norms, **ctx.learning_rate_logs()})
        names = list(logs)
        ctx._train_batch_end(batch, steps_done, step_values.view(names, range(len(names))), step_values)

    def on_epoch_end(self, epoch, logs=None):
        self.context._epoch_end(epoch, logs if logs is not None else {})

    def on_train_end(self, logs=None):
        try:
            self.context._train_end(logs)
        finally:
            self._remove_pipeline()

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
