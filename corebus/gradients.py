"""Gradient-pipeline plugins inside ``model.fit``: an optimizer wrapper.

``model.fit`` owns its train step, so the only place to transform gradients is the optimizer.
This follows Keras's ``LossScaleOptimizer`` pattern: wrap the real optimizer, run the
``transform_gradients`` hooks on the way in (at trace time, compiled into Keras's step), and
delegate everything else. One line::

    model.compile(optimizer=callback.wrap_optimizer("adam"), loss=...)
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from .context import RunContext


class GradientPipeline:
    """Accumulate (if asked) -> transform (clip, log...) -> apply, built at trace time.

    One instance per run context, shared by the engine's step and the ``model.fit`` optimizer
    wrapper, so both paths compute exactly the same update.
    """

    def __init__(self, context: RunContext):
        self.context = context
        self._accumulators: dict[str, tuple[list[Any], tf.Variable]] = {}

    def apply(self, optimizer: Any, gradients: list, variables: list, name: str = "default") -> None:
        if not optimizer.built:
            with tf.init_scope():
                optimizer.build(variables)
        steps = self.context.accumulation_steps(name)
        if steps <= 1:
            optimizer.apply(self.context.transform_gradients(gradients, variables, name), variables)
            return
        accumulators, count = self._state(name, variables)
        count.assign_add(1)
        summed = [None if g is None else a + tf.cast(g, a.dtype) for a, g in zip(accumulators, gradients)]

        def update():
            mean = [None if g is None else g / steps for g in summed]
            optimizer.apply(self.context.transform_gradients(mean, variables, name), variables)
            for accumulator in accumulators:
                accumulator.assign(tf.zeros_like(accumulator))
            return tf.constant(True)

        def accumulate():
            for accumulator, g in zip(accumulators, summed):
                if g is not None:
                    accumulator.assign(g)
            return tf.constant(False)

        tf.cond(count % steps == 0, update, accumulate)

    def prepare(self, optimizer: Any, variables: list, name: str = "default") -> None:
        """Create accumulators before the first step, so a snapshot can be restored into them."""
        if self.context.accumulation_steps(name) > 1:
            self._state(name, variables)

    def _state(self, name: str, variables: list) -> tuple[list[Any], tf.Variable]:
        if name not in self._accumulators:
            with tf.init_scope():
                accumulators = [
                    tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="grad_accumulator")
                    for v in variables
                ]
                count = tf.Variable(0, dtype=tf.int64, trainable=False, name="accumulated_micro_batches")
            self._accumulators[name] = (accumulators, count)
        return self._accumulators[name]

    def state_variables(self) -> list[Any]:
        """Accumulators and counters (for run snapshots)."""
        return [v for accs, count in self._accumulators.values() for v in [*accs, count]]


@keras.saving.register_keras_serializable(package="corebus")
class GradientPipelineOptimizer(keras.optimizers.Optimizer):
    """Runs the corebus gradient pipeline, then lets ``inner_optimizer`` apply the result."""

    def __init__(self, inner_optimizer: Any, context: RunContext | None = None, name: str | None = None):
        inner = keras.optimizers.get(inner_optimizer)
        super().__init__(learning_rate=0.0, name=name or f"corebus_{inner.name}")
        self.inner_optimizer = inner
        self._context = context

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            self.build(trainable_variables)
        variables = list(trainable_variables or self._trainable_variables)
        if self._context is None:
            self.inner_optimizer.apply(list(grads), trainable_variables=variables)
        else:
            self._context.gradient_pipeline.apply(self.inner_optimizer, list(grads), variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("GradientPipelineOptimizer supports the TensorFlow backend only")

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def wrap_optimizer(optimizer: Any, callback: Any) -> GradientPipelineOptimizer:
    """Wrap ``optimizer`` so ``callback``'s gradient plugins run inside ``model.fit``."""
    return GradientPipelineOptimizer(optimizer, callback.context)


def unwrap(optimizer: Any) -> Any:
    """The optimizer that owns the learning rate and the slots."""
    while isinstance(optimizer, GradientPipelineOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer
