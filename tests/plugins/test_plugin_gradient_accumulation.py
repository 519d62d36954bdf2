"""GradientAccumulation against one big batch and against Keras's ``gradient_accumulation_steps``."""

import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError, CorebusError, hookimpl
from corebus.plugins import GradientAccumulation, GradientClipping
from corebus.testing import make_trainer, tiny_data, tiny_model

# 128 samples at batch 16: 8 micro-batches an epoch, 2 updates of 4; 2 epochs -> 4 updates.
X, Y = tiny_data(n=128)
FIT = {"epochs": 2, "shuffle": False, "verbose": 0}


def engine_fit(plugins=(), batch_size=16, **kwargs):
    trainer = make_trainer(list(plugins), **kwargs)
    trainer.fit(X, Y, batch_size=batch_size, **FIT)
    return trainer


def keras_fit(optimizer, batch_size=16):
    model = tiny_model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(X, Y, batch_size=batch_size, **FIT)
    return model


@functools.cache
def big_batch_weights():
    """The oracle of 4 x 16: plain SGD at batch 64 (computed once)."""
    return engine_fit(batch_size=64).model.get_weights()


def wrapped_fit(optimizer, plugins, batch_size=16):
    """model.fit with the corebus callback and its optimizer wrapper."""
    callback = corebus.KerasCallback(plugins)
    model = tiny_model()
    model.compile(
        optimizer=callback.wrap_optimizer(optimizer), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(X, Y, batch_size=batch_size, callbacks=[callback], **FIT)
    return model, callback.context


def assert_weights_equal(a, b, atol=1e-6):
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_allclose(wa, wb, rtol=0, atol=atol)


def max_difference(a, b):
    return max(float(np.max(np.abs(wa - wb))) for wa, wb in zip(a, b, strict=True))


def test_four_micro_batches_update_like_one_batch_of_64():
    big_batch = big_batch_weights()
    trainer = engine_fit([GradientAccumulation(steps=4)])
    keras_model = keras_fit(keras.optimizers.SGD(gradient_accumulation_steps=4))
    wrapped_model, context = wrapped_fit("sgd", [GradientAccumulation(steps=4)])

    assert_weights_equal(trainer.model.get_weights(), big_batch)
    assert_weights_equal(keras_model.get_weights(), big_batch)
    assert_weights_equal(wrapped_model.get_weights(), big_batch)
    assert max_difference(engine_fit().model.get_weights(), big_batch) > 1e-3  # 16 updates land elsewhere

    # Steps count optimizer updates: 2 epochs x 8 micro-batches / 4.
    assert int(trainer.optimizer.iterations.numpy()) == trainer.global_step == 4
    assert trainer.micro_step == 16
    assert int(keras_model.optimizer.iterations.numpy()) == 4
    assert int(wrapped_model.optimizer.iterations.numpy()) == context.global_step == 4
    assert context.micro_step == 16


def test_steps_per_execution_does_not_change_the_result():
    trainer = engine_fit([GradientAccumulation(steps=4)], steps_per_execution=3)  # calls of 3, 3, 2
    assert_weights_equal(trainer.model.get_weights(), big_batch_weights())
    assert trainer.global_step == int(trainer.optimizer.iterations.numpy()) == 4


def test_clipping_sees_the_accumulated_mean_gradient():
    clip = 0.05
    keras_optimizer = keras.optimizers.SGD(gradient_accumulation_steps=4, global_clipnorm=clip)
    reference = keras_fit(keras_optimizer).get_weights()
    clipper = GradientClipping(global_norm=clip, log_norm=True)
    trainer = engine_fit([GradientAccumulation(steps=4), clipper])
    wrapped_model, _ = wrapped_fit("sgd", [GradientClipping(global_norm=clip), GradientAccumulation(steps=4)])

    assert_weights_equal(trainer.model.get_weights(), reference)
    assert_weights_equal(wrapped_model.get_weights(), reference)
    assert clipper.last_norm > 0.1 > clip  # the clip was active
    assert max_difference(big_batch_weights(), reference) > 1e-3


def test_adam_matches_keras_gradient_accumulation():
    reference = keras_fit(keras.optimizers.Adam(gradient_accumulation_steps=4)).get_weights()
    trainer = engine_fit([GradientAccumulation(steps=4)], optimizer="adam")
    wrapped_model, _ = wrapped_fit("adam", [GradientAccumulation(steps=4)])
    assert_weights_equal(trainer.model.get_weights(), reference)
    assert_weights_equal(wrapped_model.get_weights(), reference)
    assert max_difference(keras_fit("adam").get_weights(), reference) > 1e-4


def test_a_schedule_counts_updates_not_micro_batches():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.5)
    seen = []

    class ReadLR:
        @hookimpl
        def on_train_batch_end(self, trainer):
            seen.append((trainer.global_step, trainer.lr.value))

    trainer = engine_fit([GradientAccumulation(steps=4), ReadLR()], optimizer=keras.optimizers.SGD(schedule))
    wrapped_model, _ = wrapped_fit(keras.optimizers.SGD(schedule), [GradientAccumulation(steps=4)])
    big_batch = keras_fit(keras.optimizers.SGD(schedule), batch_size=64).get_weights()

    # After micro-batch k the next update uses schedule(update count) = 0.5 * 0.5 ** (k // 4).
    assert seen == [(k // 4, pytest.approx(float(schedule(k // 4)))) for k in range(1, 17)]
    assert trainer.lr.value == pytest.approx(0.5 * 0.5**4)
    # So the LR trajectory, and the weights, are those of batch 64 ...
    assert_weights_equal(trainer.model.get_weights(), big_batch)
    assert_weights_equal(wrapped_model.get_weights(), big_batch)
    # ... unlike Keras's own gradient_accumulation_steps, whose schedule sees micro-batches.
    keras_own = keras_fit(keras.optimizers.SGD(schedule, gradient_accumulation_steps=4)).get_weights()
    assert max_difference(keras_own, big_batch) > 1e-3


def test_only_the_named_optimizer_accumulates_in_a_custom_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    first, second = keras.layers.Dense(1), keras.layers.Dense(1)
    model = keras.Sequential([keras.Input((3,)), first, second])

    def step(trainer, data):
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        for name, layer in (("first", first), ("second", second)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(inputs)))
            trainer.apply_gradients(
                tape.gradient(loss, layer.trainable_variables), layer.trainable_variables, optimizer=name
            )
        return {"loss": loss}

    accumulation = GradientAccumulation(steps=4, optimizers=["second"])
    trainer = corebus.Trainer(
        model, optimizer={"first": "sgd", "second": "sgd"}, train_step=step, plugins=[accumulation], seed=0
    )
    trainer.fit(x, batch_size=8, epochs=1, verbose=0)  # 8 micro-batches
    assert accumulation.gradient_accumulation_steps(optimizer_name="first") is None
    assert int(trainer.optimizers["first"].iterations.numpy()) == 8
    assert int(trainer.optimizers["second"].iterations.numpy()) == 2


def test_state_round_trip_and_resume_with_a_partial_accumulation():
    # 112 samples: 7 micro-batches an epoch, so an accumulation straddles the epoch boundary
    # (Keras carries it over too).
    x, y = X[:112], Y[:112]
    keras_model = tiny_model()
    keras_model.compile(
        optimizer=keras.optimizers.SGD(gradient_accumulation_steps=4), loss="sparse_categorical_crossentropy"
    )
    keras_model.fit(x, y, batch_size=16, **FIT)

    first = GradientAccumulation(steps=4)
    trainer = make_trainer([first])
    trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert trainer.global_step == 1 and trainer.micro_step == 7
    resumed = GradientAccumulation(**json.loads(json.dumps(first.get_config())))
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    # Same Trainer: the pipeline keeps the 3 accumulated micro-batches, as a run snapshot would.
    trainer._plugins = [("GradientAccumulation", resumed)]
    trainer.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, shuffle=False, verbose=0)

    assert_weights_equal(trainer.model.get_weights(), keras_model.get_weights())
    assert trainer.global_step == int(trainer.optimizer.iterations.numpy()) == 14 // 4

    mismatch = r"trained with GradientAccumulation\(steps=4.*this run has steps=2,"
    with pytest.raises(ConfigError, match=mismatch):
        GradientAccumulation(steps=2).load_state_dict(first.state_dict())


def test_config_and_repr_are_json_friendly():
    plugin = GradientAccumulation(steps=8, optimizers="generator")
    assert json.loads(json.dumps(plugin.get_config())) == {"steps": 8, "optimizers": ["generator"]}
    assert repr(plugin) == "GradientAccumulation(steps=8, optimizers=['generator'])"
    assert repr(GradientAccumulation(**plugin.get_config())) == repr(plugin)
    assert type(GradientAccumulation(steps=np.int64(4)).steps) is int  # what the core's hook check wants
    state = GradientAccumulation(steps=1).state_dict()
    assert json.loads(json.dumps(state)) == {"steps": 1, "optimizers": None}


def test_activated_by_name_from_a_config_mapping():
    trainer = engine_fit([{"name": "gradient_accumulation", "steps": 4}])
    assert trainer.global_step == 4
    assert_weights_equal(trainer.model.get_weights(), big_batch_weights())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, r"steps=0 must be an integer >= 1"),
        ({"steps": -3}, r"steps=-3 must be an integer >= 1"),
        ({"steps": 2.0}, r"steps=2.0 must be an integer"),
        ({"steps": "4"}, r"steps='4' must be an integer"),
        ({"steps": True}, r"steps=True must be an integer"),
        ({"steps": 4, "optimizers": []}, r"optimizers=\[\] must be None or a non-empty list"),
    ],
)
def test_bad_input_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GradientAccumulation(**kwargs)


def test_bad_params_by_name_and_two_accumulators_fail_before_training():
    with pytest.raises(ConfigError, match="gradient_accumulation.*rejected its params.*steps=0"):
        make_trainer([{"name": "gradient_accumulation", "steps": 0}])
    with pytest.raises(ConfigError, match="gradient_accumulation.*bad params"):
        make_trainer(["gradient_accumulation"])  # steps is required
    with pytest.raises(ConfigError, match="both control 'grads.accumulation'"):
        make_trainer([GradientAccumulation(steps=2), GradientAccumulation(steps=4)])


def test_unknown_optimizer_name_fails_before_any_step():
    trainer = make_trainer([GradientAccumulation(steps=4, optimizers=["generater"])])
    with pytest.raises(CorebusError) as err:
        trainer.fit(X, Y, batch_size=16, **FIT)
    # The bus wraps errors raised inside hooks in PluginError; the cause is the ConfigError.
    cause = err.value if isinstance(err.value, ConfigError) else err.value.__cause__
    assert isinstance(cause, ConfigError)
    assert "no optimizer named ['generater']; this run has ['default']" in str(cause)
    assert int(trainer.optimizer.iterations.numpy()) == 0


class WithOverwrittenVariable(keras.layers.Layer):
    """A dense layer plus a variable whose gradient is its next value (`overwrite_with_gradient`,
    the float8 pattern): its gradient differs from micro-batch to micro-batch."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 3), initializer="glorot_uniform")
        self.scale = self.add_weight(shape=(3,), initializer="zeros")
        self.scale.overwrite_with_gradient = True

    def call(self, x):
        return keras.ops.softmax(x @ self.kernel + self.scale * keras.ops.mean(x, axis=1, keepdims=True))


def overwrite_model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), WithOverwrittenVariable()])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def test_overwrite_with_gradient_variables_match_keras_accumulation():
    keras_model = overwrite_model()
    keras_model.compile(
        optimizer=keras.optimizers.SGD(gradient_accumulation_steps=4, global_clipnorm=0.05),
        loss="sparse_categorical_crossentropy",
    )
    keras_model.fit(X, Y, batch_size=16, **FIT)
    plugins = lambda: [GradientAccumulation(4), GradientClipping(global_norm=0.05)]  # noqa: E731
    fitted = overwrite_model()
    fitted.fit(X, Y, batch_size=16, callbacks=[corebus.KerasCallback(plugins())], **FIT)
    trainer = make_trainer(plugins(), model=overwrite_model(), optimizer="sgd", metrics=[])
    trainer.fit(X, Y, batch_size=16, **FIT)
    reference = keras_model.get_weights()
    assert np.abs(reference[1]).max() > 1e-3  # the overwritten variable moved
    assert_weights_equal(fitted.get_weights(), reference)
    assert_weights_equal(trainer.model.get_weights(), reference)


def test_gradient_histograms_with_accumulation_in_the_engine(tmp_path, caplog):
    # 6 micro-batches an epoch, an update every 4: epoch 0's last call completes no update.
    # The histograms are each epoch's last update, and Trainer.fit says nothing about model.fit.
    from tensorboard.backend.event_processing import event_accumulator

    from corebus.integrations import TensorBoardLogger

    class Weights:
        def __init__(self):
            self.by_micro_step = {}

        @hookimpl
        def on_train_begin(self, trainer):
            self.by_micro_step[0] = [w.numpy().astype("float64") for w in trainer.model.trainable_weights]

        @hookimpl
        def on_train_batch_end(self, trainer):
            self.by_micro_step[trainer.micro_step] = [
                w.numpy().astype("float64") for w in trainer.model.trainable_weights
            ]

    lr, spy = 0.1, Weights()
    logger = TensorBoardLogger(tmp_path, histogram_freq=1)
    trainer = make_trainer([spy, logger, GradientAccumulation(4)], optimizer=keras.optimizers.SGD(lr))
    x, y = tiny_data()  # 96 samples
    trainer.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    assert "wrap_optimizer" not in caplog.text
    events = event_accumulator.EventAccumulator(str(tmp_path / "train"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    last_update = {0: 4, 1: 12, 2: 16}  # micro-steps 1-6, 7-12, 13-18
    for index, weight in enumerate(trainer.model.trainable_weights):
        rows = {e.step: tf.make_ndarray(e.tensor_proto) for e in events.Tensors(f"{weight.path}/gradient_histogram")}
        assert sorted(rows) == [0, 1, 2]
        for epoch, micro in last_update.items():
            gradient = (spy.by_micro_step[micro - 1][index] - spy.by_micro_step[micro][index]) / lr
            assert rows[epoch][:, 2].sum() == gradient.size
            np.testing.assert_allclose(rows[epoch][:, 0].min(), gradient.min(), rtol=1e-4, atol=1e-7)
