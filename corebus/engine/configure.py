"""Turning ``Trainer``'s arguments into a ready run: checks, strategy, mixed precision,
optimizers and ``compile``, and the variables built before the first compiled call.

Every check here fails before training with one message naming the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from corebus.engine.data import ArrayData, DatasetData
from corebus.errors import ConfigError

MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


def check_validation_freq(freq: Any) -> None:
    if isinstance(freq, bool) or not (
        (isinstance(freq, int) and freq >= 1)
        or (isinstance(freq, (list, tuple, set, range)) and all(isinstance(e, int) and e >= 1 for e in freq))
    ):
        raise ConfigError(
            f"validation_freq={freq!r}: pass an integer >= 1 (validate every N epochs) or a "
            "list of 1-based epochs to validate after, as model.fit takes"
        )


def should_validate(epoch: int, freq: Any) -> bool:
    """Keras's rule, with 1-based epochs."""
    return (epoch + 1) % freq == 0 if isinstance(freq, int) else (epoch + 1) in freq


def verbosity(verbose: Any, data: Any = None) -> int:
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


def overrides_step(model: keras.Model, name: str) -> bool:
    """Whether the model's class defines its own ``train_step`` / ``test_step`` (keras.io's
    "customizing what happens in fit"), which the engine must run instead of its own."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return getattr(type(model), name) is not getattr(TensorFlowTrainer, name)


def setup_mixed_precision(trainer: Any, policy: str | None) -> None:
    if policy is not None:
        if policy not in MIXED_POLICIES:
            raise ConfigError(f"mixed_precision={policy!r}: use one of {', '.join(MIXED_POLICIES)} (or None)")
        # Variables stay float32 under a mixed policy, so a built model can switch: each
        # layer casts its inputs to the compute dtype from its next call on.
        for layer in trainer.model._flatten_layers(include_self=True):
            layer.dtype_policy = policy
    trainer.mixed_precision = (
        trainer.model.dtype_policy.name if trainer.model.dtype_policy.name in MIXED_POLICIES else None
    )


def setup_strategy(trainer: Any, strategy: Any, seed: int | None) -> None:
    if strategy is None:
        return
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ConfigError(f"strategy must be a tf.distribute.Strategy, got {type(strategy).__name__}")
    outside = [
        v.path for v in trainer.model.weights if not strategy.extended.variable_created_in_scope(getattr(v, "value", v))
    ]
    if outside:
        raise ConfigError(
            f"the model's variables ({outside[0]}, ...) were not created in the strategy's scope: "
            "build the model inside `with strategy.scope():`"
        )
    trainer.num_replicas = strategy.num_replicas_in_sync
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if spec:
        trainer.num_workers = sum(len(tasks) for kind, tasks in spec.items() if kind in ("chief", "worker"))
        task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
        trainer.rank = task_id + (1 if task_type == "worker" and "chief" in spec else 0)
        trainer.is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in spec)
        if seed is None:  # every worker must shuffle alike: same order, different rows
            trainer.seed = 0


def setup_optimizers(trainer: Any, optimizer: Any, loss: Any, metrics: Any) -> None:
    if trainer._user_train_step is None:
        if isinstance(optimizer, Mapping):
            raise ConfigError("several optimizers need a custom train_step to say which applies where")
        args = trainer._compile_args
        given = (optimizer, loss, metrics, args["loss_weights"], args["weighted_metrics"])
        if all(a is None for a in given) and trainer.model.compiled:
            pass  # use the model's own compile() settings
        else:
            if loss is None and not trainer.model.compiled and not trainer._model_train_step:
                raise ConfigError("no loss: pass loss=... (e.g. 'sparse_categorical_crossentropy')")
            compile_model(trainer, optimizer if optimizer is not None else "rmsprop", loss, metrics)
        if trainer.mixed_precision == "mixed_float16" and not isinstance(
            trainer.model.optimizer, keras.optimizers.LossScaleOptimizer
        ):
            trainer.model.optimizer = keras.optimizers.LossScaleOptimizer(trainer.model.optimizer)
        trainer.optimizers = {"default": trainer.model.optimizer}
        trainer.loss = trainer.model.loss
    else:
        if not isinstance(optimizer, Mapping) and (
            loss is not None or any(v is not None for k, v in trainer._compile_args.items() if k != "auto_scale_loss")
        ):
            # a custom step may use model.compute_loss / compute_metrics, as in keras.io's guides
            compile_model(trainer, optimizer or "adam", loss, metrics)
            optimizer = trainer.model.optimizer
        specs = optimizer if isinstance(optimizer, Mapping) else {"default": optimizer or "adam"}
        try:
            trainer.optimizers = {name: keras.optimizers.get(spec) for name, spec in specs.items()}
            if trainer.mixed_precision == "mixed_float16":
                trainer.optimizers = {
                    name: o
                    if isinstance(o, keras.optimizers.LossScaleOptimizer)
                    else keras.optimizers.LossScaleOptimizer(o)
                    for name, o in trainer.optimizers.items()
                }
            trainer.loss = keras.losses.get(loss) if loss is not None else None
            trainer.metrics = [keras.metrics.get(m) for m in (metrics or [])]
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad optimizer/loss/metrics: {exc}") from exc


def compile_model(trainer: Any, optimizer: Any, loss: Any, metrics: Any) -> None:
    try:
        trainer.model.compile(
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            run_eagerly=trainer.run_eagerly,
            steps_per_execution=trainer.steps_per_execution,
            jit_compile=False
            if trainer._jit_compile_arg == "auto" and trainer.run_eagerly
            else trainer._jit_compile_arg,
            **trainer._compile_args,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad optimizer/loss/metrics (or other compile arguments): {exc}") from exc


def build(trainer: Any, data: ArrayData | DatasetData) -> None:
    """Create every variable (model, metrics, optimizer) before the first compiled call."""
    with trainer._scope():
        build_variables(trainer, data)


def build_variables(trainer: Any, data: ArrayData | DatasetData) -> None:
    if trainer._user_train_step is not None and trainer.strategy is not None:
        for name, optimizer in trainer.optimizers.items():
            trainer.gradient_pipeline.prepare(optimizer, [], name)
    if trainer._user_train_step is None:
        # Keras's own pre-build (model, compiled loss/metrics, optimizer), as model.fit does;
        # it is also where Keras resolves loss and metric identifiers.
        try:
            trainer.model._symbolic_build(data_batch=data.first_batch())
        except (ValueError, TypeError) as exc:
            raise ConfigError(_build_error(trainer.model, data, exc)) from exc
        if not trainer.model.optimizer.built:
            trainer.model.optimizer.build(trainer.model.trainable_variables)
        trainer.gradient_pipeline.prepare(trainer.model.optimizer, trainer.model.trainable_variables)


def build_for_eval(trainer: Any, data: ArrayData | DatasetData) -> None:
    if trainer.model.compiled:
        trainer.model._symbolic_build(data_batch=data.first_batch())


def check_targets(trainer: Any, x: Any, y: Any, data: Any) -> None:
    """``fit(x)`` without targets, for a compiled loss that needs them: say so before training."""
    if y is not None or not isinstance(data, ArrayData) or trainer._user_train_step is not None:
        return
    if overrides_step(trainer.model, "train_step"):
        return
    if getattr(trainer.model, "loss", None) is not None:
        raise ConfigError(
            "fit got x but no targets (y=None) for a model compiled with a loss: pass y=..., "
            "or a dataset that yields (x, y)"
        )
