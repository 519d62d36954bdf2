"""Gradient-pipeline plugins inside ``model.fit``: an optimizer wrapper.

``model.fit`` owns its train step, so the only place to transform gradients is the optimizer.
This follows Keras's ``LossScaleOptimizer`` pattern: wrap the real optimizer, run the
``transform_gradients`` hooks on the way in (at trace time, compiled into Keras's step), and
delegate everything else. :class:`corebus.KerasCallback` puts the wrapper around the model's
optimizer for the length of each ``fit`` and takes it off at the end, so the model a user
saves holds their own optimizer.
"""

from __future__ import annotations

from typing import Any, Protocol

import keras
import tensorflow as tf

from corebus.engine.optimizer_chain import lr_owner


class PipelineOwner(Protocol):
    """What the pipeline needs from the run it serves: the plugins' gradient hooks and the
    requested taps (``corebus.engine.dispatch.GRADIENT_TAPS``). The run's
    :class:`corebus.engine.dispatch.Dispatch` is one: the pipeline holds the bus's dispatch,
    never the run context."""

    gradient_taps: frozenset[str]

    def accumulation_steps(self, optimizer_name: str = "default") -> int: ...

    def transform_gradients(self, gradients: list, variables: list, optimizer_name: str = "default") -> list: ...


class GradientPipeline:
    """Accumulate (if asked) -> tap -> transform (clip...) -> apply, built at trace time.

    One instance per run, shared by the engine's step and the ``model.fit`` optimizer
    wrapper, so both paths compute exactly the same update.

    **Taps** let loggers see the gradients without a host round-trip per step. A plugin asks
    for them with a class attribute ``gradient_taps = {"norm", "values"}``:

    - ``"norm"``: the global L2 norm of the gradients the optimizer is about to apply (before
      clipping; with accumulation, of the accumulated mean, at each update) is kept in a
      variable per optimizer. The engine adds it to ``on_log``'s batch values as
      ``grad_norm`` (``grad_norm/<optimizer>`` for named optimizers), in the same packed host
      fetch as the other values; :meth:`gradient_norm` reads it.
    - ``"values"``: while :meth:`capture_gradients` is on, every update also copies its
      gradients into variables that :meth:`captured_gradients` reads (for histograms). Off,
      this costs one ``tf.cond`` on a boolean per step. With accumulation every update is
      copied (one copy per accumulated update): the last update of an epoch may fall in a
      call before the one that switched capturing on.
    """

    def __init__(self, hooks: PipelineOwner):
        self.hooks = hooks
        self._accumulators: dict[str, tuple[list[Any], tf.Variable]] = {}
        self._norms: dict[str, tf.Variable] = {}
        self._captures: dict[str, tuple[list[Any], list[Any]]] = {}
        self._capture_on: tf.Variable | None = None
        self._copy_always: set[str] = set()  # optimizers that accumulate: every update is copied

    def apply(self, optimizer: Any, gradients: list, variables: list, name: str = "default") -> None:
        if not optimizer.built:
            with tf.init_scope():
                optimizer.build(variables)
        # Dynamic loss scaling (mixed_float16): the pipeline works on unscaled gradients, so a
        # clipping threshold or a logged norm means what it says; the optimizer gets them
        # scaled back (exact: the scale is a power of two) and keeps Keras's skip-and-lower
        # logic for overflowing steps.
        scale = getattr(optimizer, "dynamic_scale", None)
        if scale is not None:
            gradients = [None if g is None else g / tf.cast(scale, g.dtype) for g in gradients]
            inner_apply = optimizer.apply

            def apply(grads, variables):
                inner_apply([None if g is None else g * tf.cast(scale, g.dtype) for g in grads], variables)
        else:
            apply = optimizer.apply
        # Variables marked `overwrite_with_gradient` (e.g. float8 scales) take their gradient as
        # their new value: as in Keras, they are neither clipped nor counted in a norm, and
        # under accumulation they take the largest micro-batch value, not the mean.
        overwrite = [bool(getattr(v, "overwrite_with_gradient", False)) for v in variables]
        steps = self.hooks.accumulation_steps(name)

        def transformed(grads):
            plain = [None if o else g for g, o in zip(grads, overwrite)]
            self._tap(plain, variables, name, always=steps > 1)
            out = self.hooks.transform_gradients(plain, variables, name)
            return [g if o else t for t, g, o in zip(out, grads, overwrite)]

        if steps <= 1:
            apply(transformed(gradients), variables)
            return
        accumulators, count = self._state(name, variables)
        count.assign_add(1)
        summed = [
            None if g is None else (tf.maximum(tf.cast(g, a.dtype), a) if o else a + tf.cast(g, a.dtype))
            for a, g, o in zip(accumulators, gradients, overwrite)
        ]

        def update():
            mean = [None if g is None else (g if o else g / steps) for g, o in zip(summed, overwrite)]
            apply(transformed(mean), variables)
            for accumulator in accumulators:
                accumulator.assign(tf.zeros_like(accumulator))
            return tf.constant(True)

        def accumulate():
            for accumulator, g in zip(accumulators, summed):
                if g is not None:
                    accumulator.assign(g)
            return tf.constant(False)

        tf.cond(count % steps == 0, update, accumulate)

    def _tap(self, gradients: list, variables: list, name: str, always: bool = False) -> None:
        taps = self.hooks.gradient_taps
        if "norm" in taps:
            present = [g for g in gradients if g is not None]
            if present:
                self._norm_variable(name).assign(tf.cast(tf.linalg.global_norm(present), tf.float32))
        if "values" in taps:
            copies = self._capture_variables(name, variables)

            def copy():
                for target, g in zip(copies, gradients):
                    if g is not None:
                        target.assign(tf.cast(tf.convert_to_tensor(g), target.dtype))
                self._captured.assign_add(1)
                self._copied.assign_add(1)
                return tf.constant(True)

            if always:
                self._copy_always.add(name)
                copy()
            else:
                tf.cond(self._capture_on, copy, lambda: tf.constant(False))

    @staticmethod
    def _variable(store: dict[str, Any], name: str, create: Any) -> Any:
        if name not in store:
            with tf.init_scope():
                store[name] = create()
        return store[name]

    # Under a tf.distribute strategy these are created in its scope before the first step
    # (prepare): the norm is the replicas' mean, captured gradients are the first replica's.
    def _norm_variable(self, name: str) -> tf.Variable:
        return self._variable(
            self._norms,
            name,
            lambda: tf.Variable(0.0, trainable=False, name="grad_norm", aggregation=tf.VariableAggregation.MEAN),
        )

    def _capture_variables(self, name: str, variables: list) -> list[tf.Variable]:
        if self._capture_on is None:
            with tf.init_scope():
                first = tf.VariableAggregation.ONLY_FIRST_REPLICA
                self._capture_on = tf.Variable(False, trainable=False, name="capture_gradients", aggregation=first)
                self._captured = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="captured_updates", aggregation=first
                )
                self._copied = tf.Variable(0, dtype=tf.int64, trainable=False, name="copied_updates", aggregation=first)
        return self._variable(
            self._captures,
            name,
            lambda: (
                list(variables),
                [
                    tf.Variable(
                        tf.zeros(v.shape, v.dtype),
                        trainable=False,
                        name="captured_gradient",
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                    )
                    for v in variables
                ],
            ),
        )[1]

    def norm_logs(self) -> dict[str, Any]:
        """The ``"norm"`` tap's values under their log names: ``grad_norm`` for the default
        optimizer, ``grad_norm/<name>`` for named ones (empty before the first trace)."""
        return {
            "grad_norm" if name == "default" else f"grad_norm/{name}": variable.value()
            for name, variable in self._norms.items()
        }

    def gradient_norm(self, name: str = "default") -> float | None:
        """The last update's global gradient norm (``"norm"`` tap), or ``None`` before one."""
        variable = self._norms.get(name)
        return None if variable is None else float(variable.numpy())

    def capture_gradients(self, on: bool) -> None:
        """Start or stop copying each update's gradients (``"values"`` tap) for the host."""
        if self._capture_on is not None:
            self._capture_on.assign(bool(on))
            if on:
                self._captured.assign(0)

    def captured_gradients(self, name: str = "default") -> list[tuple[Any, Any]]:
        """``(variable, numpy gradient)`` pairs of the last captured update of ``name``; empty
        when no update ran through the pipeline since capturing was switched on (with
        accumulation: the last update, empty before the first)."""
        if self._capture_on is None:
            return []
        counter = self._copied if name in self._copy_always else self._captured
        if int(counter.numpy()) == 0:
            return []
        variables, copies = self._captures.get(name, ([], []))
        return [(v, c.numpy()) for v, c in zip(variables, copies)]

    def prepare(self, optimizer: Any, variables: list, name: str = "default") -> None:
        """Create accumulators (a snapshot may be restored into them) and tap variables before
        the first step."""
        if self.hooks.accumulation_steps(name) > 1:
            self._state(name, variables)
        if "norm" in self.hooks.gradient_taps:
            self._norm_variable(name)
        if "values" in self.hooks.gradient_taps and variables:
            self._capture_variables(name, variables)

    def _state(self, name: str, variables: list) -> tuple[list[Any], tf.Variable]:
        if name not in self._accumulators:
            with tf.init_scope():
                accumulators = [
                    tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="grad_accumulator") for v in variables
                ]
                count = tf.Variable(0, dtype=tf.int64, trainable=False, name="accumulated_micro_batches")
            self._accumulators[name] = (accumulators, count)
        return self._accumulators[name]

    def state_variables(self) -> list[Any]:
        """Accumulators and counters (for run snapshots)."""
        return [v for accs, count in self._accumulators.values() for v in [*accs, count]]


@keras.saving.register_keras_serializable(package="corebus")
class GradientPipelineOptimizer(keras.optimizers.Optimizer):
    """Runs the corebus gradient pipeline, then lets the wrapped optimizer apply the result.

    It saves as the optimizer it wraps: a model saved while it is in place (a checkpoint
    during ``fit``) holds the wrapped optimizer's variables where a plain model holds them,
    so ``keras.saving.load_model`` reads the file without corebus.
    """

    def __init__(self, inner_optimizer: Any, context: Any = None, name: str | None = None):
        inner = keras.optimizers.get(inner_optimizer)
        super().__init__(learning_rate=0.0, name=name or f"corebus_{inner.name}")
        self._inner = inner
        self._context = context  # the run context: its gradient_pipeline applies the update
        self.traced = False  # whether a step has applied gradients through it (set at trace time)

    @property
    def inner_optimizer(self) -> Any:
        """The optimizer inside Keras's wrappers (what owns the learning rate; the pipeline
        itself applies through :attr:`wrapped`, e.g. a ``LossScaleOptimizer``)."""
        return lr_owner(self._inner)

    @property
    def wrapped(self) -> Any:
        """The optimizer this one wraps, as it was given."""
        return self._inner

    def __dir__(self):
        # Keras's saving walks dir(): show it the wrapped optimizer's children under their
        # own names (a LossScaleOptimizer's inner_optimizer), not the wrapped one itself.
        names = [n for n in super().__dir__() if n not in ("_inner", "inner_optimizer")]
        if hasattr(self._inner, "inner_optimizer"):
            names.append("inner_optimizer")
        return names

    def save_own_variables(self, store):
        self._inner.save_own_variables(store)

    def load_own_variables(self, store):
        self._inner.load_own_variables(store)

    def build(self, var_list):
        if not self._inner.built:
            self._inner.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self._inner.variables

    def apply(self, grads, trainable_variables=None):
        self.traced = True
        if not self.built:
            self.build(trainable_variables)
        variables = list(trainable_variables or self._trainable_variables)
        if self._context is None:
            self._inner.apply(list(grads), trainable_variables=variables)
        else:
            self._context.gradient_pipeline.apply(self._inner, list(grads), variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("GradientPipelineOptimizer supports the TensorFlow backend only")

    @property
    def learning_rate(self):
        return self._inner.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self._inner.learning_rate = learning_rate

    @property
    def iterations(self):
        return self._inner.iterations

    def scale_loss(self, loss):
        return self._inner.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self._inner.finalize_variable_values(var_list)

    def get_config(self):
        return {"name": self.name, "inner_optimizer": keras.saving.serialize_keras_object(self._inner)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def wrap_optimizer(optimizer: Any, callback: Any = None) -> Any:
    """The Keras optimizer for ``optimizer`` (a name, config or instance), unwrapped.

    Kept for scripts written before :class:`corebus.KerasCallback` wrapped the model's
    optimizer itself: the callback now runs its gradient plugins on whatever optimizer the
    model was compiled with, so this is no longer needed. It returns the plain optimizer, so
    the compiled model (and every file it saves) does not depend on corebus.
    """
    return unwrap(keras.optimizers.get(optimizer))


def unwrap(optimizer: Any) -> Any:
    """The optimizer under corebus's wrappers (Keras's own, such as a LossScaleOptimizer,
    stay): the one a plain model is compiled with."""
    while isinstance(optimizer, GradientPipelineOptimizer):
        optimizer = optimizer.wrapped
    return optimizer
