"""The engine's user-facing class: ``corebus.Trainer``, a compiled custom training loop with plugins.

:class:`Trainer` is the run context plugins see as ``trainer``; it takes ``model.fit`` /
``compile`` arguments and hands each job to its own object: the compiled step
(:mod:`corebus.engine.step`), the packed-log layout (:mod:`corebus.engine.packed_logs`), the
loops (:mod:`corebus.engine.loop`), hook dispatch (:mod:`corebus.engine.dispatch`), run
snapshots (:mod:`corebus.engine.run_state`), and setup checks (:mod:`corebus.engine.configure`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping
from typing import Any

import keras
import tensorflow as tf

from corebus.bus import registry
from corebus.bus.bus import PluginBus
from corebus.engine.configure import (
    build,
    build_for_eval,
    check_targets,
    check_validation_freq,
    overrides_step,
    setup_mixed_precision,
    setup_optimizers,
    setup_strategy,
    verbosity,
)
from corebus.engine.context import RunContext
from corebus.engine.data import make_data, split_validation
from corebus.engine.dispatch import takes_batch_records
from corebus.engine.loop import EpochLoop
from corebus.engine.packed_logs import STEP_VALUE, PackedLogs, _mean_metric_names
from corebus.engine.run_state import RunState
from corebus.engine.step import CompiledStep
from corebus.errors import ConfigError

TrainStep = Callable[["Trainer", Any], Mapping[str, Any]]

__all__ = ["Trainer", "TrainStep", "STEP_VALUE"]


class Trainer(RunContext):
    """Train a Keras model with a compiled custom loop, plugins attached.

    :param model: a ``keras.Model``.
    :param optimizer: a Keras optimizer or identifier (``"adam"``); for custom steps with
        several optimizers, a dict ``{"generator": ..., "discriminator": ...}``. Defaults to the
        model's compiled optimizer, else ``"rmsprop"`` as ``model.compile`` does.
    :param loss: a Keras loss or identifier, as ``model.compile`` accepts.
    :param metrics: Keras metrics or identifiers, as ``model.compile`` accepts.
    :param plugins: instances, entry-point names, ``{"name": ..., **params}`` mappings, or a
        path to a TOML/YAML file listing them.
    :param train_step: optional ``(trainer, data) -> dict of scalars``, traced into the compiled
        step. Call ``trainer.apply_gradients(grads, variables, optimizer="name")`` inside it so
        the gradient pipeline (clipping, accumulation, logging) applies per optimizer.
    :param test_step: optional ``(trainer, data) -> dict`` for ``evaluate`` with custom steps.
    :param loss_weights, weighted_metrics, auto_scale_loss: as ``model.compile`` takes them.
    :param run_eagerly: run the steps eagerly (debugging), as ``model.compile(run_eagerly=True)``.
    :param steps_per_execution: steps run per compiled call; batch hooks fire once per call.
        ``None``: the compiled model's value, else 1.
    :param strategy: a ``tf.distribute`` strategy (``MirroredStrategy``,
        ``MultiWorkerMirroredStrategy``). Create the model inside ``strategy.scope()``;
        ``batch_size`` is the global batch (split evenly over the replicas; the last partial
        batch of an epoch is dropped so every replica runs every step). Logs are reduced across
        replicas; plugins declaring ``runs_on = "chief"`` (writers, loggers) run on the chief
        worker only; a stop decided at an epoch end on any worker stops them all.
    :param mixed_precision: ``"mixed_float16"`` or ``"mixed_bfloat16"``: sets the model's layers
        to that Keras dtype policy (float32 variables, half-precision compute) and, for float16,
        scales the loss dynamically with Keras's ``LossScaleOptimizer`` around each optimizer.
        Gradient plugins (clipping, norms) see unscaled gradients; a step whose gradients
        overflow is skipped and the scale lowered, as in Keras. A custom ``train_step``
        multiplies its loss by ``trainer.scale_loss(loss, optimizer=name)`` before taking
        gradients. ``None``: follow the model's own policy (a model built under
        ``keras.mixed_precision.set_global_policy("mixed_float16")`` gets loss scaling).
    :param jit_compile: compile the step with XLA; ``"auto"`` resolves as Keras does (the
        compiled model's value; off on CPU).
    :param seed: seed for the per-epoch shuffle order; ``None`` draws it from Keras's global
        seed state, so after ``keras.utils.set_random_seed(s)`` runs repeat exactly.

    Every ``model.compile`` argument is taken here (or from the already compiled model when
    none of ``optimizer / loss / metrics / loss_weights / weighted_metrics`` is given); a model
    class that overrides ``train_step`` / ``test_step`` runs its own steps.
    :param profile: record host time per plugin per hook (``trainer.bus.profile_report()``).
    :param stop_signals: signals that stop a fit gracefully at the next step boundary (never
        inside an accumulation window): a snapshot of that step (with the ``backup`` plugin),
        loggers closed as stopped, exit code ``128 + signal`` (:class:`corebus.Preempted`).
        Add ``"SIGUSR1"`` for SLURM-style requeueing; ``()`` leaves signals alone.
    :param stop_timeout: seconds the shutdown after such a signal may take before the process
        exits anyway.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: Any = None,
        loss: Any = None,
        metrics: Any = None,
        plugins: Any = None,
        *,
        strategy: tf.distribute.Strategy | None = None,
        train_step: TrainStep | None = None,
        test_step: TrainStep | None = None,
        steps_per_execution: int | None = None,
        jit_compile: bool | str = "auto",
        seed: int | None = None,
        profile: bool = False,
        mixed_precision: str | None = None,
        loss_weights: Any = None,
        weighted_metrics: Any = None,
        run_eagerly: bool | None = None,
        auto_scale_loss: bool = True,
        stop_signals: Any = ("SIGTERM",),
        stop_timeout: float = 60.0,
    ):
        super().__init__()
        if not isinstance(model, keras.Model):
            raise ConfigError(
                f"model must be a keras.Model (Sequential, functional or subclassed), got {type(model).__name__}"
            )
        if steps_per_execution is None:
            steps_per_execution = getattr(model, "steps_per_execution", 1) if model.compiled else 1
        if not isinstance(steps_per_execution, int) or steps_per_execution < 1:
            raise ConfigError(f"steps_per_execution={steps_per_execution!r} must be an integer >= 1")
        if jit_compile not in (True, False, "auto"):
            raise ConfigError(f"jit_compile={jit_compile!r}: use True, False or 'auto'")
        if train_step is not None and not callable(train_step):
            raise ConfigError("train_step must be a callable (trainer, data) -> dict of logs")
        self.model = model
        self.strategy = strategy
        self.steps_per_execution = steps_per_execution
        self._compile_args = {
            "loss_weights": loss_weights,
            "weighted_metrics": weighted_metrics,
            "auto_scale_loss": auto_scale_loss,
        }
        self.run_eagerly = bool(run_eagerly if run_eagerly is not None else model.compiled and model.run_eagerly)
        self._jit_compile_arg = jit_compile
        # Keras's global seed state decides (keras.utils.set_random_seed seeds Python's random):
        # two runs of one seeded script shuffle alike, as model.fit does.
        self.seed = int(seed) if seed is not None else random.randrange(2**31)
        self.profile = profile
        from corebus.engine.stop_signals import signal_numbers

        self._stop_signals = signal_numbers(stop_signals)
        if not isinstance(stop_timeout, (int, float)) or stop_timeout <= 0:
            raise ConfigError(f"stop_timeout={stop_timeout!r} must be a number of seconds > 0")
        self._stop_timeout = float(stop_timeout)
        self._stops: Any = None
        self._user_train_step = train_step
        self._user_test_step = test_step
        # keras.io's "customizing what happens in fit": the model class's own steps run
        self._model_train_step = train_step is None and overrides_step(model, "train_step")
        self._model_test_step = test_step is None and overrides_step(model, "test_step")
        self._plugins = registry.resolve_all(plugins)
        PluginBus(self._plugins)  # validates names, order and ownership before any training
        setup_strategy(self, strategy, seed)
        setup_mixed_precision(self, mixed_precision)
        with self._scope():
            setup_optimizers(self, optimizer, loss, metrics)
        if jit_compile == "auto":  # Keras's resolution (model.jit_compile), off without a compiled model
            jit_compile = bool(self.model.compiled and self.model.jit_compile) and not self.run_eagerly
        self.jit_compile = bool(jit_compile)
        # one object per job: the compiled functions, the layout of their packed logs, the loops
        self.compiled_step = CompiledStep(self)
        custom = train_step is not None or self._model_train_step
        self.packed_logs = PackedLogs(
            self.compiled_step.train_log_names, lambda: set() if custom else _mean_metric_names(model)
        )
        self.dispatch.make_records = self.packed_logs.logged_steps
        self.loop = EpochLoop(self, self.compiled_step, self.packed_logs)
        self.run_state = RunState(self, engine_variables=self._engine_variables, keeps_seed=True)
        self.history: Any = None

    # ------------------------------------------------------------------ setup

    def _scope(self) -> Any:
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def scale_loss(self, loss: Any, optimizer: str = "default") -> Any:
        """``loss`` times the named optimizer's dynamic loss scale (``mixed_float16``), else
        ``loss``: call it in a custom ``train_step`` before taking gradients."""
        return self.optimizers[optimizer].scale_loss(loss)

    def apply_gradients(self, gradients: Any, variables: Any, optimizer: str = "default") -> None:
        """Run the gradient pipeline, then let the named optimizer apply the result.

        Call this from a custom ``train_step`` (inside the compiled step).
        """
        if optimizer not in self.optimizers:
            raise KeyError(f"no optimizer named {optimizer!r}; have {', '.join(self.optimizers)}")
        self.gradient_pipeline.apply(self.optimizers[optimizer], list(gradients), list(variables), optimizer)

    def _make_bus(self, extra: list[str], callbacks: Any = None) -> PluginBus:
        named = list(self._plugins)
        if callbacks:
            from corebus.engine.keras_callbacks import KerasCallbacks

            named.append(("keras_callbacks", KerasCallbacks.of(callbacks, self.model)))
        for name in extra:
            # the user may have activated it already (by name or as an instance, configured)
            if name not in {n for n, _ in named} and not any(
                isinstance(p, registry.load_plugin_class(name)) for _, p in named
            ):
                named.append((name, registry.instantiate(name, {})))
        everywhere = PluginBus(named, profile=self.profile)
        bus = everywhere
        if not self.is_chief:  # writers and loggers run on the chief worker only
            bus = PluginBus([(n, p) for n, p in named if getattr(p, "runs_on", "all") != "chief"], profile=self.profile)
        # Every worker must trace the same step (its collectives pair up by order): what is
        # compiled into it follows all plugins, wherever they run.
        self._use_bus(bus, compiled_for=everywhere)
        if self.strategy is not None and any(self.accumulation_steps(n) > 1 for n in self.optimizers):
            raise ConfigError(
                "gradient accumulation under a tf.distribute strategy is not supported yet: "
                "raise the global batch size instead (or train without a strategy)"
            )
        if self._model_train_step and any(
            everywhere.implementations(h) for h in ("transform_gradients", "gradient_accumulation_steps")
        ):
            raise ConfigError(
                f"{type(self.model).__name__} overrides train_step, which applies its gradients itself: gradient "
                "plugins cannot reach them. Pass the step as Trainer(train_step=...) calling "
                "trainer.apply_gradients(...), or train it with model.fit and corebus.KerasCallback (which "
                "wraps the model's optimizer)"
            )
        # Gradient hooks are compiled into the step: a different set of them needs a new trace.
        self.compiled_step.gradient_signature = tuple(
            id(impl.plugin)
            for hook in ("transform_gradients", "gradient_accumulation_steps")
            for _, impl in everywhere.implementations(hook)
        ) + tuple(sorted(self.gradient_taps))
        # Batch records carry each step's own values, measured inside the step: only computed
        # when some subscriber takes batch records (not for epoch-only loggers).
        self.compiled_step.step_values = takes_batch_records(everywhere)
        return bus

    # ------------------------------------------------------------------ public API

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        epochs: int = 1,
        verbose: Any = "auto",
        callbacks: Any = None,
        validation_split: float = 0.0,
        validation_data: Any = None,
        shuffle: bool = True,
        class_weight: Mapping[int, float] | None = None,
        sample_weight: Any = None,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        validation_steps: int | None = None,
        validation_batch_size: int | None = None,
        validation_freq: int | Any = 1,
    ) -> Any:
        """Train like ``model.fit``, with its arguments in its order; returns a Keras-like
        ``History``. ``callbacks`` are ``keras.callbacks.Callback`` objects, run with Keras's
        contract beside the plugins (:mod:`corebus.engine.keras_callbacks`)."""
        if not isinstance(epochs, int) or epochs < 0:
            raise ConfigError(f"epochs={epochs!r} must be a non-negative integer")
        if not isinstance(initial_epoch, int) or initial_epoch < 0:
            raise ConfigError(f"initial_epoch={initial_epoch!r} must be a non-negative integer")
        check_validation_freq(validation_freq)
        if validation_split and validation_data is None:
            (x, y, sample_weight), validation_data = split_validation(x, y, sample_weight, validation_split)
        self.fit_inputs = {"x": x, "y": y, "validation_data": validation_data}  # what loggers record (mlflow.data)
        data = make_data(
            x,
            y,
            sample_weight,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.seed,
            steps=steps_per_epoch,
            strategy=self.strategy,
            class_weight=class_weight,
        )
        check_targets(self, x, y, data)
        data.spans.first = initial_epoch
        val_data = None
        if validation_data is not None:
            if isinstance(validation_data, tf.data.Dataset) or not isinstance(validation_data, (tuple, list)):
                val_data = make_data(validation_data, steps=validation_steps, strategy=self.strategy, persistent=False)
            else:
                val_x, val_y, val_sw = keras.utils.unpack_x_y_sample_weight(tuple(validation_data))
                val_data = make_data(
                    val_x,
                    val_y,
                    val_sw,
                    batch_size=validation_batch_size or batch_size,
                    steps=validation_steps,
                    strategy=self.strategy,
                    persistent=False,
                )
        verbose = verbosity(verbose, data)
        bus = self._make_bus(["history"] + (["progress"] if verbose else []), callbacks)
        self.history = next(p for n, p in bus.plugins.items() if n == "history" or type(p).__name__ == "History")
        self.params = {
            "epochs": epochs,
            "steps": data.steps,
            "verbose": verbose,
            "batch_size": data.batch_size,
            "steps_per_execution": self.steps_per_execution,
            "initial_epoch": initial_epoch,
            "validation": val_data is not None,
        }
        build(self, data)
        data.reset()  # after the build's look at a batch, as Keras's fit resets its epoch iterator
        self.stop_training = False
        self._start_steps(int(self.compiled_step.step_counter.numpy()))
        self.loss_not_finite = None
        from corebus.engine.stop_signals import StopSignals

        with StopSignals(self._stop_signals, self._stop_timeout) as self._stops:
            return self.loop.fit_epochs(data, val_data, epochs, initial_epoch, validation_freq)

    def evaluate(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        verbose: Any = "auto",
        sample_weight: Any = None,
        steps: int | None = None,
        callbacks: Any = None,
        return_dict: bool = False,
    ) -> Any:
        """Evaluate like ``model.evaluate``: a scalar, a list in metric order, or a dict."""
        data = make_data(
            x, y, sample_weight, batch_size=batch_size, steps=steps, strategy=self.strategy, persistent=False
        )
        verbose = verbosity(verbose)
        self._make_bus(["progress"] if verbose else [], callbacks)
        self.params = {"epochs": 1, "steps": data.steps, "verbose": verbose}
        with self._scope():
            build_for_eval(self, data)
        logs = self.loop.evaluate_data(data)
        if return_dict:
            return logs
        return self.model._flatten_metrics_in_order(logs)

    def predict(
        self,
        x: Any,
        batch_size: int | None = None,
        verbose: Any = "auto",
        steps: int | None = None,
        callbacks: Any = None,
    ) -> Any:
        """Predict like ``model.predict``: numpy outputs for every sample."""
        data = make_data(x, batch_size=batch_size, steps=steps, persistent=False)
        verbose = verbosity(verbose)
        self._make_bus(["progress"] if verbose else [], callbacks)
        self.params = {"epochs": 1, "steps": data.steps, "verbose": verbose}
        return self.loop.predict(data)

    def describe(self, verbose: int = 1, callbacks: Any = None) -> str:
        """The hook plan of a ``fit(verbose=..., callbacks=...)`` with these plugins (no training)."""
        return self._make_bus(["history"] + (["progress"] if verbose else []), callbacks).describe()

    # ------------------------------------------------------------------ the parts' state

    #: (epoch, first step, last step) of the epoch whose loss was first NaN/inf, else None
    loss_not_finite: tuple[int, int, int] | None = None

    @property
    def _step_counter(self) -> tf.Variable:
        """Steps run by the compiled step (a variable, saved in run snapshots)."""
        return self.compiled_step.step_counter

    @property
    def _train_log_names(self) -> list[str]:
        return self.compiled_step.train_log_names

    @property
    def _step_values(self) -> bool:
        return self.compiled_step.step_values

    def _engine_variables(self) -> list[Any]:
        """The engine's own variables in a run snapshot: the step counter and the RNG state."""
        variables = [self.compiled_step.step_counter]
        try:
            variables.append(tf.random.get_global_generator().state)
        except RuntimeError:  # op determinism on and no global generator set: none to save
            pass
        return variables
