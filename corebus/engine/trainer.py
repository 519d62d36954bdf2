"""The engine: a compiled custom training loop that drives plugins through the bus."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from corebus.bus import registry
from corebus.bus.bus import PluginBus
from corebus.bus.logs import LazyLogs, LoggedStep, _Packed
from corebus.engine.context import RunContext, _takes_batch_records, lr_owner
from corebus.engine.data import ArrayData, DatasetData, make_data, split_validation
from corebus.errors import ConfigError

log = logging.getLogger("corebus")

TrainStep = Callable[["Trainer", Any], Mapping[str, Any]]

MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


def _unscale_for_distribution(loss):
    # Keras's own helper (identity without a strategy); private, so degrade gracefully.
    try:
        from keras.src.losses.loss import unscale_loss_for_distribution
    except ImportError:  # pragma: no cover - depends on the Keras version
        return loss
    return unscale_loss_for_distribution(loss)


#: Prefix, inside the packed vector, of the values only ``on_log`` sees (the step's own values).
STEP_VALUE = "@"


def _mean_metric_names(model: keras.Model) -> set[str]:
    """Log names of the model's metrics that are running means (loss tracker,
    ``MeanMetricWrapper`` metrics): a batch's own value follows from two running means."""
    names: set[str] = set()
    for metric in model.metrics:
        groups = getattr(metric, "_flat_metrics", None)
        if groups is None:
            if isinstance(metric, keras.metrics.Mean):
                names.add(metric.name)
            continue
        for group in groups:  # CompileMetrics: name as Keras does (output prefix)
            for inner in getattr(group, "metrics", None) or []:
                if isinstance(inner, keras.metrics.Mean):
                    names.add(f"{group.output_name}_{inner.name}" if group.output_name else inner.name)
    return names


def _views(names: tuple[str, ...]) -> tuple[tuple, tuple, tuple, tuple]:
    """Names and positions of the batch logs and of ``on_log``'s step values in a packed vector."""
    position = {name: i for i, name in enumerate(names)}
    logs = [n for n in names if not n.startswith(STEP_VALUE)]
    extra = [n[len(STEP_VALUE) :] for n in names if n.startswith(STEP_VALUE) and n[len(STEP_VALUE) :] not in position]
    step_names = logs + sorted(extra)
    step_positions = [position.get(STEP_VALUE + n, position.get(n)) for n in step_names]
    return tuple(logs), tuple(position[n] for n in logs), tuple(step_names), tuple(step_positions)


class _CallLayout(NamedTuple):
    """Where one trace's names sit in its packed vector, and what on_log derives (once per trace)."""

    packed_names: list[str]
    log_names: tuple[str, ...]
    log_positions: tuple[int, ...]
    step_names: tuple[str, ...]
    step_positions: tuple[int, ...]
    derived: tuple[tuple[str, int], ...]  # (name, position of its running mean)


class _HeldCall(NamedTuple):
    """A train call's output held for ``on_log_steps``: made into its step values at hand-over,
    so the training loop spends a tuple per call, not the values' Python work."""

    packed: Any
    before: tuple[Any, int, _CallLayout | None] | None  # the call before: (packed, end batch, layout)
    begin: int
    n: int
    rows: ArrayData | None
    layout: _CallLayout


def _step_logs(
    layout: _CallLayout,
    source: _Packed,
    before: tuple[_Packed, int, _CallLayout | None] | None,
    begin: int,
    n: int,
    rows: ArrayData | None,
) -> LazyLogs:
    """``on_log``'s step values of the call of batches ``begin..begin+n-1`` (a view of its packed
    vector: one fetch, on first read).

    The step's own loss comes packed from the step. Other running means (accuracy...) give
    the call's own value from two consecutive running means and the rows each covers:
    ``(mean_now * rows_now - mean_before * rows_before) / rows_in_call``, computed on the
    host when first read (no work in the step; float32 means, so the value is close, not
    bit-exact). Where rows are unknown (datasets, sample weights, a resumed epoch's first
    call), the running mean is what is logged.
    """
    derive = None
    if (
        layout.derived
        and rows is not None
        and before is not None
        and before[1] == begin
        and before[2] is layout
        and begin > 0
    ):
        derive = (layout.derived, before[0], rows.samples_before(begin), rows.samples_before(begin + n))
    return LazyLogs._of_call(layout.step_names, layout.step_positions, source, derive)


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


def _check_validation_freq(freq: Any) -> None:
    if isinstance(freq, bool) or not (
        (isinstance(freq, int) and freq >= 1)
        or (isinstance(freq, (list, tuple, set, range)) and all(isinstance(e, int) and e >= 1 for e in freq))
    ):
        raise ConfigError(
            f"validation_freq={freq!r}: pass an integer >= 1 (validate every N epochs) or a "
            "list of 1-based epochs to validate after, as model.fit takes"
        )


def _should_validate(epoch: int, freq: Any) -> bool:
    """Keras's rule, with 1-based epochs."""
    return (epoch + 1) % freq == 0 if isinstance(freq, int) else (epoch + 1) in freq


def _verbosity(verbose: Any, data: Any = None) -> int:
    if verbose == "auto":
        return 1
    if verbose not in (0, 1, 2):
        raise ConfigError(f"verbose={verbose!r}: use 'auto', 0 (silent), 1 (progress bar) or 2 (a line per epoch)")
    return int(verbose)


def _build_error(model: keras.Model, data: Any, exc: Exception) -> str:
    """Say what did not fit when Keras could not build the model on the first batch."""
    text = str(exc)
    if "shape" in text.lower() or "incompatible" in text.lower():
        try:
            x, _, _ = keras.utils.unpack_x_y_sample_weight(data.first_batch())
            got = [tuple(t.shape) for t in keras.tree.flatten(x)]
        except Exception:  # the batch itself is what failed: say what Keras said
            got = "?"
        expected = [tuple(i.shape) for i in getattr(model, "inputs", None) or []] or "(not declared)"
        return (
            f"the input does not fit the model: batches of x have shape {got}, the model takes {expected}. "
            f"Check x's feature dimensions (Keras said: {text.splitlines()[0]})"
        )
    return f"bad optimizer/loss/metrics for this model and data: {text}"


def _overrides_step(model: keras.Model, name: str) -> bool:
    """Whether the model's class defines its own ``train_step`` / ``test_step`` (keras.io's
    "customizing what happens in fit"), which the engine must run instead of its own."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return getattr(type(model), name) is not getattr(TensorFlowTrainer, name)


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
        self._model_train_step = train_step is None and _overrides_step(model, "train_step")
        self._model_test_step = test_step is None and _overrides_step(model, "test_step")
        self._plugins = registry.resolve_all(plugins)
        PluginBus(self._plugins)  # validates names, order and ownership before any training
        self._setup_strategy(strategy, seed)
        self._setup_mixed_precision(mixed_precision)
        with self._scope():
            self._setup_optimizers(optimizer, loss, metrics)
        if jit_compile == "auto":  # Keras's resolution (model.jit_compile), off without a compiled model
            jit_compile = bool(self.model.compiled and self.model.jit_compile) and not self.run_eagerly
        self.jit_compile = bool(jit_compile)
        with tf.init_scope():
            self._step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="micro_step")
        self._train_fn: dict[int, Callable] = {}
        self._test_fn: dict[int, Callable] = {}
        self._predict_fn: Callable | None = None
        self._train_log_names: list[str] = []
        self._step_values = False
        self._layout: _CallLayout | None = None
        self._previous_call: tuple[_Packed, int, _CallLayout] | None = None
        self._gradient_signature: tuple = ()
        self._results_fn: Any = None
        self._reset_fn: Callable | None = None
        self._test_log_names: list[str] = []
        self.history: Any = None

    # ------------------------------------------------------------------ setup

    def _scope(self) -> Any:
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def _setup_mixed_precision(self, policy: str | None) -> None:
        if policy is not None:
            if policy not in MIXED_POLICIES:
                raise ConfigError(f"mixed_precision={policy!r}: use one of {', '.join(MIXED_POLICIES)} (or None)")
            # Variables stay float32 under a mixed policy, so a built model can switch: each
            # layer casts its inputs to the compute dtype from its next call on.
            for layer in self.model._flatten_layers(include_self=True):
                layer.dtype_policy = policy
        self.mixed_precision = self.model.dtype_policy.name if self.model.dtype_policy.name in MIXED_POLICIES else None

    def scale_loss(self, loss: Any, optimizer: str = "default") -> Any:
        """``loss`` times the named optimizer's dynamic loss scale (``mixed_float16``), else
        ``loss``: call it in a custom ``train_step`` before taking gradients."""
        return self.optimizers[optimizer].scale_loss(loss)

    def _setup_strategy(self, strategy: Any, seed: int | None) -> None:
        if strategy is None:
            return
        if not isinstance(strategy, tf.distribute.Strategy):
            raise ConfigError(f"strategy must be a tf.distribute.Strategy, got {type(strategy).__name__}")
        outside = [
            v.path
            for v in self.model.weights
            if not strategy.extended.variable_created_in_scope(getattr(v, "value", v))
        ]
        if outside:
            raise ConfigError(
                f"the model's variables ({outside[0]}, ...) were not created in the strategy's scope: "
                "build the model inside `with strategy.scope():`"
            )
        self.num_replicas = strategy.num_replicas_in_sync
        resolver = getattr(strategy, "cluster_resolver", None)
        spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
        if spec:
            self.num_workers = sum(len(tasks) for kind, tasks in spec.items() if kind in ("chief", "worker"))
            task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
            self.rank = task_id + (1 if task_type == "worker" and "chief" in spec else 0)
            self.is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in spec)
            if seed is None:  # every worker must shuffle alike: same order, different rows
                self.seed = 0

    def _setup_optimizers(self, optimizer: Any, loss: Any, metrics: Any) -> None:
        if self._user_train_step is None:
            if isinstance(optimizer, Mapping):
                raise ConfigError("several optimizers need a custom train_step to say which applies where")
            args = self._compile_args
            given = (optimizer, loss, metrics, args["loss_weights"], args["weighted_metrics"])
            if all(a is None for a in given) and self.model.compiled:
                pass  # use the model's own compile() settings
            else:
                if loss is None and not self.model.compiled and not self._model_train_step:
                    raise ConfigError("no loss: pass loss=... (e.g. 'sparse_categorical_crossentropy')")
                self._compile(optimizer if optimizer is not None else "rmsprop", loss, metrics)
            if self.mixed_precision == "mixed_float16" and not isinstance(
                self.model.optimizer, keras.optimizers.LossScaleOptimizer
            ):
                self.model.optimizer = keras.optimizers.LossScaleOptimizer(self.model.optimizer)
            self.optimizers = {"default": self.model.optimizer}
            self.loss = self.model.loss
        else:
            if not isinstance(optimizer, Mapping) and (
                loss is not None or any(v is not None for k, v in self._compile_args.items() if k != "auto_scale_loss")
            ):
                # a custom step may use model.compute_loss / compute_metrics, as in keras.io's guides
                self._compile(optimizer or "adam", loss, metrics)
                optimizer = self.model.optimizer
            specs = optimizer if isinstance(optimizer, Mapping) else {"default": optimizer or "adam"}
            try:
                self.optimizers = {name: keras.optimizers.get(spec) for name, spec in specs.items()}
                if self.mixed_precision == "mixed_float16":
                    self.optimizers = {
                        name: o
                        if isinstance(o, keras.optimizers.LossScaleOptimizer)
                        else keras.optimizers.LossScaleOptimizer(o)
                        for name, o in self.optimizers.items()
                    }
                self.loss = keras.losses.get(loss) if loss is not None else None
                self.metrics = [keras.metrics.get(m) for m in (metrics or [])]
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"bad optimizer/loss/metrics: {exc}") from exc

    def _compile(self, optimizer: Any, loss: Any, metrics: Any) -> None:
        try:
            self.model.compile(
                optimizer=optimizer,
                loss=loss,
                metrics=metrics,
                run_eagerly=self.run_eagerly,
                steps_per_execution=self.steps_per_execution,
                jit_compile=False if self._jit_compile_arg == "auto" and self.run_eagerly else self._jit_compile_arg,
                **self._compile_args,
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad optimizer/loss/metrics (or other compile arguments): {exc}") from exc

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
        self._gradient_signature = tuple(
            id(impl.plugin)
            for hook in ("transform_gradients", "gradient_accumulation_steps")
            for _, impl in everywhere.implementations(hook)
        ) + tuple(sorted(self.gradient_taps))
        # Batch records carry each step's own values, measured inside the step: only computed
        # when some subscriber takes batch records (not for epoch-only loggers).
        self._step_values = _takes_batch_records(everywhere)
        return bus

    # ------------------------------------------------------------------ steps

    def _default_train_step(self, data: Any) -> Mapping[str, Any]:
        model = self.model
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
        self.apply_gradients(gradients, variables)
        logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if self._step_values:  # the batch's own loss, for on_log: one more value in the packed vector
            logs = {**logs, STEP_VALUE + "loss": batch_loss}
        return logs

    def _default_test_step(self, data: Any) -> Mapping[str, Any]:
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = model(x, training=False)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        model._loss_tracker.update_state(
            _unscale_for_distribution(loss),
            sample_weight=tf.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0],
        )
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def apply_gradients(self, gradients: Any, variables: Any, optimizer: str = "default") -> None:
        """Run the gradient pipeline, then let the named optimizer apply the result.

        Call this from a custom ``train_step`` (inside the compiled step).
        """
        if optimizer not in self.optimizers:
            raise KeyError(f"no optimizer named {optimizer!r}; have {', '.join(self.optimizers)}")
        self.gradient_pipeline.apply(self.optimizers[optimizer], list(gradients), list(variables), optimizer)

    def _one_train_step(self, data: Any) -> Mapping[str, Any]:
        if self._user_train_step is not None:
            logs = self._user_train_step(self, data)
        elif self._model_train_step:
            logs = self.model.train_step(data)
        else:
            logs = self._default_train_step(data)
        if self.strategy is None:  # (under a strategy the call counts steps, once per step)
            # Automatic control dependencies order ops per resource only: without this, the
            # counter could move before a get_next that then hits the end of the data.
            with tf.control_dependencies([t for t in keras.tree.flatten(data) if t is not None]):
                self._step_counter.assign_add(1)
        if not self._step_values:
            return logs
        # Read inside the step, they share the logs' one host fetch: an eager read after the
        # step costs a dispatch and a thread hand-off (a hundred-odd µs on a 2-core CPU).
        extras = {**self.gradient_pipeline.norm_logs(), **self.learning_rate_logs()}
        return {**logs, **{STEP_VALUE + key: value for key, value in extras.items()}}

    def _one_test_step(self, data: Any) -> Mapping[str, Any]:
        if self._user_test_step is not None:
            return self._user_test_step(self, data)
        if self._model_test_step:
            return self.model.test_step(data)
        if self._user_train_step is not None and not self.model.compiled:
            raise ConfigError("evaluate with a custom train_step needs test_step=... as well")
        return self._default_test_step(data)

    def _compiled(self, step: Callable, names: list[str], steps: int, take: Callable) -> Callable:
        """A ``tf.function`` running ``steps`` steps on an iterator, returning packed logs."""
        one_step = step
        if self.jit_compile:
            one_step = tf.function(step, jit_compile=True, reduce_retracing=True)

        def on_rows(source, element):  # gathers this replica's rows inside the step
            return one_step(take(source, element))

        if self.strategy is not None:
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

        return call if self.run_eagerly else tf.function(call)

    def _distributed(self, step: Callable, counts_steps: bool) -> Callable:
        """``step`` run on every replica; its logs reduced to one value each (replica mean)."""
        strategy, mean = self.strategy, tf.distribute.ReduceOp.MEAN

        def on_replica(source, element):
            return {k: tf.reduce_mean(tf.cast(v, tf.float32)) for k, v in step(source, element).items()}

        def run(source, element):
            logs = strategy.run(on_replica, args=(source, element))
            reduced = {k: strategy.reduce(mean, v, axis=None) for k, v in logs.items()}
            if counts_steps:
                with tf.control_dependencies(list(reduced.values())):
                    self._step_counter.assign_add(1)
            return reduced

        return run

    def _agree_to_stop(self) -> None:
        """Stop every worker if any worker's plugins decided to stop, or any got a stop signal
        (a collective at the epoch end: all workers call it, so they stop at one agreed step)."""
        if self.num_workers <= 1:
            return
        if getattr(self, "_any_fn", None) is None:
            strategy = self.strategy

            def any_worker(flags):
                votes = strategy.run(lambda: tf.identity(flags))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)  # votes per flag

            self._any_fn = tf.function(any_worker)
        signalled = self._stops.received
        votes = self._any_fn(tf.constant([1.0 if self.stop_training else 0.0, float(signalled or 0)])).numpy()
        self.stop_training = bool(votes[0] > 0)
        if votes[1] > 0 and signalled is None:  # another worker was signalled: stop with it
            import signal

            self._stops.received = int(signal.SIGTERM)

    def _train_function(self, steps: int, data: ArrayData | DatasetData) -> Callable:
        # The LR (a variable or a schedule) is read inside the compiled step: a schedule
        # installed after the last trace needs a new one.
        lr_signature = tuple(id(lr_owner(o)._learning_rate) for o in self.optimizers.values())
        key = (steps, type(data), self._gradient_signature, lr_signature, self._step_values)
        if key not in self._train_fn:
            self._train_fn[key] = self._compiled(self._one_train_step, self._train_log_names, steps, data.take)
        return self._train_fn[key]

    def _test_function(self, steps: int, data: ArrayData | DatasetData) -> Callable:
        key = (steps, type(data))
        if key not in self._test_fn:
            self._test_fn[key] = self._compiled(self._one_test_step, self._test_log_names, steps, data.take)
        return self._test_fn[key]

    def _build(self, data: ArrayData | DatasetData) -> None:
        """Create every variable (model, metrics, optimizer) before the first compiled call."""
        with self._scope():
            self._build_variables(data)

    def _build_variables(self, data: ArrayData | DatasetData) -> None:
        if self._user_train_step is not None and self.strategy is not None:
            for name, optimizer in self.optimizers.items():
                self.gradient_pipeline.prepare(optimizer, [], name)
        if self._user_train_step is None:
            # Keras's own pre-build (model, compiled loss/metrics, optimizer), as model.fit does;
            # it is also where Keras resolves loss and metric identifiers.
            try:
                self.model._symbolic_build(data_batch=data.first_batch())
            except (ValueError, TypeError) as exc:
                raise ConfigError(_build_error(self.model, data, exc)) from exc
            if not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.gradient_pipeline.prepare(self.model.optimizer, self.model.trainable_variables)

    # ------------------------------------------------------------------ loop pieces

    def _batches(self, steps: int | None, begin: int = 0) -> Any:
        """``(first batch index, number of steps)`` per compiled call of one epoch."""
        spe = self.steps_per_execution
        while steps is None or begin < steps:
            n = spe if steps is None else min(spe, steps - begin)
            yield begin, n
            begin += n

    def _run_epoch(self, data: ArrayData | DatasetData, epoch: int, first_batch: int = 0) -> Mapping[str, Any] | None:
        begin_hook = self._callers["on_train_batch_begin"]
        batch_end_hook = self._callers["on_train_batch_end"] is not None
        per_call_logs = batch_end_hook or self._batch_on_log is not None
        holds = self._callers["on_log_steps"] is not None
        # A call's own value of a running mean follows from the rows each call covered (below).
        rows = data if isinstance(data, ArrayData) and not data.has_sample_weight else None
        iterator = data.iterator(epoch, skip_batches=first_batch)
        source = data.source
        self._previous_call = None  # metrics were reset (or restored mid-epoch): no call before
        last_call = None  # (packed, end batch, layout) of the call before, for held records
        packed = None
        functions: dict[int, Callable] = {}  # looked up once per epoch, not once per call
        for begin, n in self._batches(data.steps_in(epoch), first_batch):
            if begin_hook is not None:
                self.batch = begin
                begin_hook(trainer=self, batch=begin, logs={})
            try:
                function = functions.get(n) or functions.setdefault(n, self._train_function(n, data))
                packed = function(iterator, source)
            except tf.errors.OutOfRangeError:
                done = self._steps_done_since(begin)
                if isinstance(data, DatasetData):
                    data.exhausted()
                if done:
                    logs = self._metrics_or(None) or {}
                    # The cut-short call packed nothing: on_log's learning rate is read here (if due).
                    due = self._batch_log_due(done) or self._batch_log_due(done, held=True)
                    step_values = (
                        None
                        if not due
                        else {
                            **logs,
                            **{key: float(np.asarray(rate)) for key, rate in self.learning_rate_logs().items()},
                        }
                    )
                    self._train_batch_end(begin + done - 1, done, logs, step_values)
                    return logs
                break
            if not self.model.built:
                # A custom step that calls only parts of the model (a GAN's two halves) built
                # every layer without Keras marking the whole model built; saving needs it.
                self.model.built = all(layer.built for layer in self.model._flatten_layers(include_self=False))
            hold = holds and self._batch_log_due(n, held=True)
            if per_call_logs:
                log_now = self._batch_log_due(n)
                logs, step_values = self._call_logs(packed, rows, begin, n, batch_end_hook, log_now or hold)
                self._batch_ended(
                    begin + n - 1, n, logs, step_values if log_now else None, step_values if hold else None
                )
            else:
                self._advance(n)
                if holds:  # on_log_steps subscribers only: a call's record is made at hand-over
                    layout = self._call_layout()
                    if hold:
                        self._hold_step_log(_HeldCall(packed, last_call, begin, n, rows, layout))
                    last_call = (packed, begin + n, layout)
            if self.stop_training:
                break
            stops = self._stops
            # Several workers agree on the stop at the epoch end instead (_agree_to_stop): a
            # step boundary chosen by one worker alone would leave the others in a collective.
            if stops.received is not None and self.num_workers <= 1 and self.micro_step % self._accumulation == 0:
                raise stops.stop()
        if packed is None:
            return None
        # The last call's own source where its views were made: they share one fetch.
        source_of_last = self._previous_call[0] if self._previous_call is not None else _Packed(packed)
        layout = self._call_layout()
        return LazyLogs._of_call(layout.log_names, layout.log_positions, source_of_last)

    def _call_layout(self) -> "_CallLayout":
        """Where the current trace's names sit in its packed vector (rebuilt after a new trace)."""
        layout = self._layout
        if layout is None or layout.packed_names != self._train_log_names:
            names = tuple(self._train_log_names)
            log_names, log_positions, step_names, step_positions = _views(names)
            custom = self._user_train_step is not None or self._model_train_step
            means = set() if custom else _mean_metric_names(self.model)
            packed_own = {name[len(STEP_VALUE) :] for name in names if name.startswith(STEP_VALUE)}
            # running means whose own value the step does not pack: derived from two calls
            derived = tuple(
                (name, position)
                for name, position in zip(log_names, log_positions)
                if name in means and name not in packed_own
            )
            layout = self._layout = _CallLayout(
                list(names), log_names, log_positions, step_names, step_positions, derived
            )
        return layout

    def _call_logs(
        self, packed: Any, rows: ArrayData | None, begin: int, n: int, want_logs: bool, want_values: bool
    ) -> tuple[LazyLogs | None, LazyLogs | None]:
        """The batch logs (Keras's running means) and on_log's step values (:func:`_step_logs`)
        of one call, each only when wanted (views of one packed vector: one fetch, on first read)."""
        layout = self._call_layout()
        source = _Packed(packed)
        previous, self._previous_call = self._previous_call, (source, begin + n, layout)
        logs = LazyLogs._of_call(layout.log_names, layout.log_positions, source) if want_logs else None
        if not want_values:
            return logs, None
        return logs, _step_logs(layout, source, previous, begin, n, rows)

    def _logged_steps(self, held: list[tuple[int, int, float, Any]]) -> list[LoggedStep]:
        sources: dict[int, _Packed] = {}  # one per packed tensor: a call and the next share its fetch

        def source_of(packed: Any) -> _Packed:
            return sources.get(id(packed)) or sources.setdefault(id(packed), _Packed(packed))

        records = []
        for step, previous_step, at, values in held:
            if type(values) is _HeldCall:
                before = values.before
                if before is not None:
                    before = (source_of(before[0]), before[1], before[2])
                values = _step_logs(
                    values.layout, source_of(values.packed), before, values.begin, values.n, values.rows
                )
            records.append(LoggedStep(step, previous_step, at, values))
        return records

    def _steps_done_since(self, begin: int) -> int:
        # A call that hit the end of a dataset of unknown length ran some of its steps:
        # the step counter variable tells how many.
        done = int(self._step_counter.numpy()) - self._counter_at_epoch_start - begin
        return max(done, 0)

    def _metrics_or(self, logs: Mapping[str, Any] | None) -> dict[str, float]:
        """Keras's rule: the model's metric results, unless a custom step reports other keys."""
        metric_logs = self._metric_results() if self.model.compiled else {}
        if logs is None or (metric_logs and set(logs) == set(metric_logs)):
            chosen = metric_logs
        else:
            chosen = logs
        return {k: float(np.asarray(v)) if np.ndim(v) == 0 else np.asarray(v) for k, v in sorted(dict(chosen).items())}

    def _metric_results(self) -> dict[str, Any]:
        """``model.get_metrics_result()`` as one compiled call and one host fetch (eagerly it is
        a few small ops and a sync per metric, every epoch and every validation pass). A vector
        metric (``F1Score(average=None)``) stays a vector, as in Keras's logs."""
        if self._results_fn is None:
            shapes: list[tuple[str, tuple]] = []

            def results():
                values = self.model.get_metrics_result()
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

    def _reset_metrics(self) -> None:
        # a custom step's own metrics (Trainer(metrics=...)) start every epoch afresh too; the
        # compiled reset follows the metrics' variables (compile metrics build in the first step)
        metrics = list(self.model.metrics) + list(getattr(self, "metrics", None) or [])
        key = tuple((id(m), len(m.variables)) for m in metrics)
        if self._reset_fn is None or self._reset_fn[0] != key:

            def reset():
                for metric in metrics:
                    metric.reset_state()
                return tf.constant(0)

            self._reset_fn = (key, tf.function(reset))
        self._reset_fn[1]()

    def _evaluate_data(self, data: ArrayData | DatasetData) -> dict[str, float]:
        data.reset()
        self._test_begin()
        self._reset_metrics()
        begin_hook = self._callers["on_test_batch_begin"]
        end_hook = self._callers["on_test_batch_end"]
        iterator = data.iterator(0)
        source = data.source
        logs: Mapping[str, Any] | None = None
        for begin, n in self._batches(data.steps):
            if begin_hook is not None:
                begin_hook(trainer=self, batch=begin, logs={})
            try:
                packed = self._test_function(n, data)(iterator, source)
            except tf.errors.OutOfRangeError:
                break
            logs = LazyLogs(self._test_log_names, packed)
            if end_hook is not None:
                end_hook(trainer=self, batch=begin + n - 1, logs=logs)
        data.epoch_done()
        result = self._metrics_or(logs)
        self._test_end(result)
        return result

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
        _check_validation_freq(validation_freq)
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
        self._check_targets(x, y, data)
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
        verbose = _verbosity(verbose, data)
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
        self._build(data)
        data.reset()  # after the build's look at a batch, as Keras's fit resets its epoch iterator
        self.stop_training = False
        self._start_steps(int(self._step_counter.numpy()))
        self.loss_not_finite = None
        from corebus.engine.stop_signals import StopSignals

        with StopSignals(self._stop_signals, self._stop_timeout) as self._stops:
            return self._fit_epochs(data, val_data, epochs, initial_epoch, validation_freq)

    def _fit_epochs(self, data: Any, val_data: Any, epochs: int, initial_epoch: int, validation_freq: Any) -> Any:
        epoch_logs: dict[str, float] | None = None
        try:
            self._train_begin()
            # Keras's BackupAndRestore says where to start through model._initial_epoch.
            start_epoch, skip = getattr(self.model, "_initial_epoch", None) or initial_epoch, 0
            if self._resume_at is not None:  # a plugin restored a run snapshot
                (start_epoch, skip), self._resume_at = self._resume_at, None
                if isinstance(data, ArrayData):
                    data.seed = self.seed
            for epoch in range(start_epoch, epochs):
                if self.stop_training:  # the snapshot was taken after a plugin stopped the run
                    break
                if self._stops.received is not None and epoch > start_epoch:
                    self._at_epoch_end = True  # a snapshot now resumes at this epoch's start
                    raise self._stops.stop()
                if skip:
                    # Mid-epoch resume: metrics were restored and on_epoch_begin already ran
                    # before the interruption (repeating it could apply a per-epoch change twice).
                    self.epoch = epoch
                    self._counter_at_epoch_start = self.micro_step - skip
                else:
                    self._reset_metrics()
                    self._counter_at_epoch_start = self.micro_step
                    self._epoch_begin(epoch)
                last = self._run_epoch(data, epoch, skip)
                data.epoch_done()
                if (
                    last is None
                    and epoch == start_epoch
                    and not skip
                    and self.micro_step == self._counter_at_epoch_start
                ):
                    raise ConfigError("the first epoch got no batches: the training data is empty")
                skip = 0
                epoch_logs = self._metrics_or(last)
                self._watch_loss(epoch, epoch_logs)
                if val_data is not None and _should_validate(epoch, validation_freq):
                    val_logs = self._evaluate_data(val_data)
                    epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
                    epoch_logs = dict(sorted(epoch_logs.items()))
                self._epoch_end(epoch, epoch_logs)
                self._agree_to_stop()
                if self.stop_training:
                    break
            for optimizer in self.optimizers.values():
                optimizer.finalize_variable_values(self.model.trainable_variables)
            self._train_end(epoch_logs)
        except BaseException as exc:
            data.epoch_done()
            self._exception(exc)
            raise
        finally:
            if hasattr(self.model, "_initial_epoch"):
                self.model._initial_epoch = None
        return self.history

    #: (epoch, first step, last step) of the epoch whose loss was first NaN/inf, else None
    loss_not_finite: tuple[int, int, int] | None = None

    def _watch_loss(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """One warning when the loss stops being finite (a run that goes on after NaN is not
        silently "finished"); ``trainer.loss_not_finite`` tells the report and loggers."""
        loss = logs.get("loss")
        if self.loss_not_finite is not None or not isinstance(loss, float) or np.isfinite(loss):
            return
        self.loss_not_finite = (epoch, self._counter_at_epoch_start + 1, self.micro_step)
        log.warning(
            "the loss is %s at the end of epoch %d (it turned non-finite between steps %d and %d); "
            "training goes on: add the terminate_on_nan plugin (or keras.callbacks.TerminateOnNaN) "
            "to stop at the first such step",
            loss,
            epoch + 1,
            *self.loss_not_finite[1:],
        )

    def _check_targets(self, x: Any, y: Any, data: Any) -> None:
        """``fit(x)`` without targets, for a compiled loss that needs them: say so before training."""
        if y is not None or not isinstance(data, ArrayData) or self._user_train_step is not None:
            return
        if _overrides_step(self.model, "train_step"):
            return
        if getattr(self.model, "loss", None) is not None:
            raise ConfigError(
                "fit got x but no targets (y=None) for a model compiled with a loss: pass y=..., "
                "or a dataset that yields (x, y)"
            )

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
        verbose = _verbosity(verbose)
        self._make_bus(["progress"] if verbose else [], callbacks)
        self.params = {"epochs": 1, "steps": data.steps, "verbose": verbose}
        with self._scope():
            self._build_for_eval(data)
        logs = self._evaluate_data(data)
        if return_dict:
            return logs
        return self.model._flatten_metrics_in_order(logs)

    def _build_for_eval(self, data: ArrayData | DatasetData) -> None:
        if self.model.compiled:
            self.model._symbolic_build(data_batch=data.first_batch())

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
        verbose = _verbosity(verbose)
        self._make_bus(["progress"] if verbose else [], callbacks)
        self.params = {"epochs": 1, "steps": data.steps, "verbose": verbose}
        if self._predict_fn is None:
            model = self.model

            def predict_call(iterator, source, take):
                x_batch, _, _ = keras.utils.unpack_x_y_sample_weight(take(source, next(iterator)))
                return model(x_batch, training=False)

            self._predict_fn = tf.function(predict_call)
        self._predict_begin()
        outputs = []
        iterator = data.iterator(0)
        for begin, _ in self._batches_of_one(data.steps):
            self._predict_batch_begin(begin)
            try:
                batch_out = self._predict_fn(iterator, data.source, data.take)
            except tf.errors.OutOfRangeError:
                break
            batch_out = keras.tree.map_structure(np.asarray, batch_out)
            outputs.append(batch_out)
            self._predict_batch_end(begin, {"outputs": batch_out})
        data.epoch_done()
        self._predict_end()
        if not outputs:
            raise ConfigError("predict got no batches")
        return keras.tree.map_structure_up_to(outputs[0], lambda *parts: np.concatenate(parts), *outputs)

    def _batches_of_one(self, steps: int | None) -> Any:
        begin = 0
        while steps is None or begin < steps:
            yield begin, 1
            begin += 1

    # ------------------------------------------------------------------ snapshots

    def _state_variables(self) -> dict[str, list[Any]]:
        groups = super()._state_variables()
        groups["engine"] = [self._step_counter]
        try:
            groups["engine"].append(tf.random.get_global_generator().state)
        except RuntimeError:  # op determinism on and no global generator set: none to save
            pass
        return groups

    def _run_state(self) -> dict[str, Any]:
        return {**super()._run_state(), "seed": self.seed}

    def _load_run_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))
        super()._load_run_state(state)

    def describe(self, verbose: int = 1, callbacks: Any = None) -> str:
        """The hook plan of a ``fit(verbose=..., callbacks=...)`` with these plugins (no training)."""
        return self._make_bus(["history"] + (["progress"] if verbose else []), callbacks).describe()
