"""Mixed precision: Keras dtype policies on the model, dynamic loss scaling in the engine's step,
gradient plugins on unscaled gradients. float32 training on the same data is the oracle."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError, hookimpl
from corebus.testing import make_trainer, tiny_model

FIT = dict(batch_size=16, epochs=4, verbose=0, shuffle=False)


class Updates:
    """The weights around every step (SGD: the applied gradient is -delta / lr)."""

    def __init__(self):
        self.weights = []

    @hookimpl
    def on_train_batch_begin(self, trainer):
        self.weights.append(_flat(trainer.model))

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.weights.append(_flat(trainer.model))

    def applied(self, lr):
        return [np.linalg.norm(b - a) / lr for a, b in zip(self.weights[::2], self.weights[1::2])]


def _flat(model):
    return np.concatenate([np.asarray(w, np.float64).reshape(-1) for w in model.trainable_weights])


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_close_to_float32(tiny_data, policy):
    x, y = tiny_data
    reference = make_trainer(optimizer=keras.optimizers.SGD(0.1)).fit(x, y, **FIT).history
    trainer = make_trainer(optimizer=keras.optimizers.SGD(0.1), mixed_precision=policy)
    history = trainer.fit(x, y, **FIT).history
    compute = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[policy]
    dense = trainer.model.layers[0]
    assert dense.compute_dtype == compute and dense.kernel.dtype == "float32"  # half compute, float32 weights
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    tolerance = {"mixed_bfloat16": 3e-2, "mixed_float16": 5e-3}[policy]  # bfloat16 has 8 bits of mantissa
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=tolerance)
    assert history["loss"][-1] < history["loss"][0]


def test_clipping_and_gradient_norms_see_unscaled_gradients(tiny_data):
    x, y = tiny_data
    updates, norms = Updates(), []

    class Norms:
        gradient_taps = {"norm"}

        @hookimpl
        def on_log(self, kind, logs):
            if kind == "batch":
                norms.append(logs["grad_norm"])

    clip = 0.05
    trainer = make_trainer(
        [updates, Norms(), {"name": "gradient_clipping", "global_norm": clip}],
        optimizer=keras.optimizers.SGD(0.1),
        mixed_precision="mixed_float16",
    )
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    scale = float(trainer.optimizer.dynamic_scale.numpy())
    assert scale == 2.0**15  # no overflow: the scale was in use all along
    # the optimizer applied gradients of norm `clip`: clipped after unscaling, not before
    np.testing.assert_allclose(updates.applied(0.1), clip, rtol=2e-2)
    assert 2 * clip < min(norms) < 100  # the logged norm is the unscaled raw gradient's


def test_an_overflowing_step_is_skipped_and_the_scale_lowered(tiny_data):
    x, y = tiny_data
    updates = Updates()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**40)
    trainer = make_trainer([updates], optimizer=optimizer, mixed_precision="mixed_float16")
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    applied = updates.applied(0.1)
    skipped = [i for i, norm in enumerate(applied) if norm == 0]
    assert skipped and skipped == list(range(len(skipped)))  # the first steps overflowed float16
    assert all(norm > 0 for norm in applied[len(skipped) :])
    assert float(trainer.optimizer.dynamic_scale.numpy()) == 2.0 ** (40 - len(skipped))
    assert trainer.optimizer is optimizer  # the user's own LossScaleOptimizer is kept


def test_custom_step_scales_its_loss_per_optimizer(tiny_data):
    x, y = tiny_data
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def step(trainer, data):
        xb, yb = data
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, trainer.model(xb, training=True))
            scaled = trainer.scale_loss(loss, optimizer="main")
        trainer.apply_gradients(
            tape.gradient(scaled, trainer.model.trainable_variables),
            trainer.model.trainable_variables,
            optimizer="main",
        )
        return {"loss": loss}

    def run(policy):
        trainer = corebus.Trainer(
            tiny_model(), optimizer={"main": keras.optimizers.SGD(0.1)}, train_step=step, mixed_precision=policy, seed=0
        )
        return trainer, trainer.fit(x, y, **FIT).history

    trainer, history = run("mixed_float16")
    _, reference = run(None)
    assert isinstance(trainer.optimizers["main"], keras.optimizers.LossScaleOptimizer)
    assert float(trainer.optimizers["main"].dynamic_scale.numpy()) == 2.0**15
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=5e-3)


def test_unknown_policy_is_rejected():
    with pytest.raises(ConfigError, match="mixed_precision='float8': use one of mixed_float16, mixed_bfloat16"):
        make_trainer(mixed_precision="float8")


def test_lr_plugins_reach_the_optimizer_inside_the_loss_scaler(tiny_data):
    x, y = tiny_data
    trainer = make_trainer(
        [
            {
                "name": "lr_schedule",
                "schedule": "exponential",
                "initial_learning_rate": 0.1,
                "decay_steps": 1,
                "decay_rate": 0.5,
            }
        ],
        optimizer="sgd",
        mixed_precision="mixed_float16",
    )
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert trainer.lr.value == pytest.approx(0.1 * 0.5**6)
    assert trainer.lr.optimizer is trainer.optimizer.inner_optimizer
