"""The engine against Keras: same results, same hooks, same step semantics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError, LazyLogs, PluginError, hookimpl
from corebus.testing import RecordingPlugin, make_trainer, tiny_model


def keras_fit(x, y, optimizer="sgd", steps_per_execution=1, callbacks=(), **fit_kwargs):
    model = tiny_model()
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    fit_kwargs.setdefault("verbose", 0)
    history = model.fit(x, y, shuffle=False, callbacks=list(callbacks), **fit_kwargs)
    return model, history


def test_fit_matches_model_fit(tiny_data):
    x, y = tiny_data
    trainer = make_trainer()
    history = trainer.fit(x, y, batch_size=16, epochs=3, validation_split=0.25, shuffle=False, verbose=0)
    model, keras_history = keras_fit(x, y, batch_size=16, epochs=3, validation_split=0.25)
    assert list(history.history) == list(keras_history.history)
    assert history.epoch == keras_history.epoch == [0, 1, 2]
    for key in keras_history.history:
        np.testing.assert_allclose(history.history[key], keras_history.history[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(trainer.model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert trainer.global_step == 3 * 5  # 72 train samples / 16 -> 5 steps per epoch


def test_evaluate_and_predict_match_keras(tiny_data):
    x, y = tiny_data
    trainer = make_trainer()
    trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    model, _ = keras_fit(x, y, batch_size=16, epochs=2)
    np.testing.assert_allclose(
        trainer.evaluate(x, y, batch_size=10, verbose=0), model.evaluate(x, y, batch_size=10, verbose=0), rtol=1e-5
    )
    assert set(trainer.evaluate(x, y, verbose=0, return_dict=True)) == {"loss", "accuracy"}
    np.testing.assert_allclose(
        trainer.predict(x, batch_size=7, verbose=0), model.predict(x, batch_size=7, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_dataset_input_and_validation_data(tiny_data):
    x, y = tiny_data
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    trainer = make_trainer()
    history = trainer.fit(train, epochs=2, validation_data=(x[:20], y[:20]), verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert trainer.global_step == 2 * 6


def test_dataset_of_unknown_length_runs_to_its_end(tiny_data):
    x, y = tiny_data
    unknown = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(16)
    assert int(unknown.cardinality()) < 0
    trainer = make_trainer(steps_per_execution=4)
    trainer.fit(unknown, epochs=2, verbose=0)
    assert trainer.global_step == 2 * 6


def test_steps_per_epoch_with_an_infinite_dataset(tiny_data):
    x, y = tiny_data
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    trainer = make_trainer()
    trainer.fit(endless, epochs=3, steps_per_epoch=4, verbose=0)
    assert trainer.global_step == 12
    with pytest.raises(ConfigError, match="infinite"):
        trainer.fit(endless, epochs=1, verbose=0)


def test_steps_per_execution_fires_batch_hooks_once_per_call_like_keras(tiny_data):
    x, y = tiny_data
    engine_rec, keras_rec = RecordingPlugin(), RecordingPlugin()
    make_trainer([engine_rec], steps_per_execution=5).fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    keras_fit(x, y, steps_per_execution=5, callbacks=[corebus.KerasCallback([keras_rec])], batch_size=8, epochs=2)
    batch_events = [e[:3] for e in engine_rec.events if e[0].startswith("on_train_batch")]
    # 96 samples / 8 = 12 steps per epoch: calls of 5, 5 and 2 steps
    assert batch_events[:6] == [
        ("on_train_batch_begin", 0, 0),
        ("on_train_batch_end", 4, 5),
        ("on_train_batch_begin", 5, 5),
        ("on_train_batch_end", 9, 10),
        ("on_train_batch_begin", 10, 10),
        ("on_train_batch_end", 11, 12),
    ]
    assert engine_rec.events == keras_rec.events
    # on_log's step values carry the learning rate in both modes
    assert all("learning_rate" in e[3] for e in engine_rec.events if e[:2] == ("on_log", "batch"))


def test_global_step_survives_across_fits(tiny_data):
    x, y = tiny_data
    trainer = make_trainer()
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    recorder = RecordingPlugin()
    trainer._plugins.append(("recorder", recorder))
    trainer.fit(x, y, batch_size=32, epochs=2, initial_epoch=1, verbose=0)
    assert recorder.events[0] == ("on_train_begin", 3)
    assert trainer.global_step == 6 and int(trainer._step_counter.numpy()) == 6


class StopAt:
    def __init__(self, step=None, epoch=None):
        self.step, self.epoch = step, epoch

    @hookimpl
    def on_train_batch_end(self, trainer):
        if self.step is not None and trainer.global_step >= self.step:
            trainer.stop_training = True

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        if self.epoch is not None and epoch >= self.epoch:
            trainer.stop_training = True


@pytest.mark.parametrize("stopper", [lambda: StopAt(step=7), lambda: StopAt(epoch=1)])
def test_stop_training_same_in_both_modes(tiny_data, stopper):
    x, y = tiny_data
    (engine, engine_history), (keras_plugins, keras_history) = corebus.testing.fit_both_ways(
        lambda: [stopper(), RecordingPlugin()], x, y, batch_size=16, epochs=5
    )
    assert engine[1].events == keras_plugins[1].events
    assert engine_history.epoch == keras_history.epoch
    assert len(engine_history.epoch) == 2


class LRControl:
    def __init__(self):
        self.seen = []

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        self.seen.append(trainer.lr.value)
        if epoch == 0:
            trainer.lr.set(0.05)
        if epoch == 1:
            trainer.lr.multiplier = 0.5


def test_lr_handle_in_both_modes(tiny_data):
    x, y = tiny_data
    (engine, _), (keras_plugins, _) = corebus.testing.fit_both_ways(
        lambda: [LRControl()], x, y, batch_size=16, epochs=3
    )
    np.testing.assert_allclose(engine[0].seen, [0.01, 0.05, 0.025], rtol=1e-6)
    np.testing.assert_allclose(keras_plugins[0].seen, engine[0].seen, rtol=1e-6)


def test_schedule_built_into_the_optimizer_composes_with_a_multiplier(tiny_data):
    # In plain Keras, setting the LR of an optimizer built with a schedule raises TypeError
    # (the ReduceLROnPlateau + schedule crash); here a plateau multiplier scales the schedule.
    x, y = tiny_data
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    seen = []

    class HalveEachEpoch:
        @hookimpl
        def on_epoch_end(self, trainer):
            trainer.lr.multiplier = trainer.lr.multiplier * 0.5
            seen.append((trainer.global_step, trainer.lr.value))

    trainer = make_trainer([HalveEachEpoch()], optimizer=keras.optimizers.SGD(learning_rate=schedule))
    with pytest.raises(RuntimeError, match="owned by a schedule"):
        trainer.lr.set(0.1)
    trainer.fit(x, y, batch_size=32, epochs=3, verbose=0)
    expected = [(3 * (e + 1), float(schedule(3 * (e + 1))) * 0.5 ** (e + 1)) for e in range(3)]
    assert [s for s, _ in seen] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in seen], [v for _, v in expected], rtol=1e-6)


def test_lr_multiplier_scales_a_schedule(tiny_data):
    x, y = tiny_data
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    trainer = make_trainer(optimizer=keras.optimizers.SGD(learning_rate=schedule))
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    trainer.lr.multiplier = 0.25
    assert trainer.lr.value == pytest.approx(float(schedule(3)) * 0.25)
    with pytest.raises(RuntimeError, match="two learning-rate schedules"):
        trainer.lr.set_schedule(lambda step: 0.1, owner="lr_schedule")


def test_batch_logs_are_not_fetched_unless_read(tiny_data):
    x, y = tiny_data

    class Ignores:
        @hookimpl
        def on_train_batch_end(self, logs):
            assert "loss" in logs  # names are free

    class Reads:
        @hookimpl
        def on_train_batch_end(self, logs):
            assert 0 <= logs["accuracy"] <= 1 and logs["loss"] > 0

    before = LazyLogs.fetches
    make_trainer([Ignores()]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert LazyLogs.fetches == before
    make_trainer([Reads()]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert LazyLogs.fetches == before + 24  # one fetch per step for both values


class ZeroGradients:
    def __init__(self):
        self.names = []

    @hookimpl
    def transform_gradients(self, gradients, optimizer_name):
        self.names.append(optimizer_name)
        return [tf.zeros_like(g) for g in gradients]


def test_gradient_pipeline_in_engine_and_model_fit(tiny_data):
    x, y = tiny_data
    (engine, engine_history), (keras_plugins, _) = corebus.testing.fit_both_ways(
        lambda: [ZeroGradients()], x, y, batch_size=16, epochs=2
    )
    initial = tiny_model().get_weights()
    for plugins, _model in ((engine, engine_history.model), (keras_plugins, None)):
        assert plugins[0].names and set(plugins[0].names) == {"default"}  # traced, not called per step
        assert len(plugins[0].names) <= 2
    for a, b in zip(engine_history.model.get_weights(), initial):
        np.testing.assert_array_equal(a, b)


def test_custom_train_step_with_two_optimizers_gets_every_hook():
    x = np.random.default_rng(0).normal(size=(64, 2)).astype("float32")
    gan = corebus.testing.tiny_gan()
    generator, discriminator = gan.generator, gan.discriminator
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def gan_step(trainer, data):
        real, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        noise = tf.random.normal((tf.shape(real)[0], 4))
        with tf.GradientTape() as tape:
            fake = generator(noise)
            d_loss = bce(tf.ones_like(real[:, :1]), discriminator(real)) + bce(
                tf.zeros_like(real[:, :1]), discriminator(fake)
            )
        trainer.apply_gradients(
            tape.gradient(d_loss, discriminator.trainable_variables),
            discriminator.trainable_variables,
            optimizer="discriminator",
        )
        with tf.GradientTape() as tape:
            g_loss = bce(tf.ones_like(real[:, :1]), discriminator(generator(noise)))
        trainer.apply_gradients(
            tape.gradient(g_loss, generator.trainable_variables), generator.trainable_variables, optimizer="generator"
        )
        return {"d_loss": d_loss, "g_loss": g_loss}

    recorder, seen = RecordingPlugin(read_logs=True), []

    class SeeOptimizers:
        @hookimpl
        def transform_gradients(self, optimizer_name, gradients):
            seen.append(optimizer_name)

    trainer = corebus.Trainer(
        gan,
        optimizer={"discriminator": "adam", "generator": "adam"},
        train_step=gan_step,
        plugins=[recorder, SeeOptimizers()],
        seed=0,
    )
    history = trainer.fit(x, batch_size=16, epochs=2, verbose=0)
    assert set(history.history) == {"d_loss", "g_loss"}
    assert sorted(set(seen)) == ["discriminator", "generator"]
    assert int(trainer.optimizers["generator"].iterations.numpy()) == 8
    assert int(trainer.optimizers["discriminator"].iterations.numpy()) == 8
    assert trainer.global_step == 8
    assert recorder.names().count("on_train_batch_end") == 8
    assert set(recorder.events[-1][2]) == {"d_loss", "g_loss"}


def test_jit_compile(tiny_data):
    x, y = tiny_data
    trainer = make_trainer(jit_compile=True)
    history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    _, keras_history = keras_fit(x, y, batch_size=16, epochs=2)
    np.testing.assert_allclose(history.history["loss"], keras_history.history["loss"], rtol=1e-4)


def test_shuffle_is_reproducible_from_the_seed(tiny_data):
    x, y = tiny_data
    a = make_trainer(seed=3)
    a.fit(x, y, batch_size=16, epochs=2, verbose=0)
    b = make_trainer(seed=3)
    b.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_exception_in_a_plugin_reaches_on_exception_and_names_the_plugin(tiny_data):
    x, y = tiny_data
    seen = []

    class Explodes:
        @hookimpl
        def on_train_batch_end(self, batch):
            if batch == 2:
                raise RuntimeError("disk full")

    class Watches:
        @hookimpl
        def on_exception(self, exception):
            seen.append(exception)

        @hookimpl
        def on_train_end(self):
            seen.append("ended")

    with pytest.raises(PluginError, match=r"'Explodes' failed in on_train_batch_end: RuntimeError: disk full"):
        make_trainer([Explodes(), Watches()]).fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert len(seen) == 1 and isinstance(seen[0], PluginError)


@pytest.mark.parametrize(
    "kwargs, fit_kwargs, message",
    [
        ({"model": "not a model"}, {}, "must be a keras.Model"),
        ({"plugins": [RecordingPlugin]}, {}, "forget the parentheses"),
        ({"plugins": ["no_such_plugin"]}, {}, "unknown plugin 'no_such_plugin'. Installed plugins: "),
        ({"steps_per_execution": 0}, {}, "steps_per_execution"),
        ({"optimizer": {"a": "adam", "b": "adam"}}, {}, "custom train_step"),
        ({"loss": "no_such_loss"}, {}, "bad optimizer/loss/metrics"),
        ({}, {"y": np.zeros(5)}, "x has 96 samples but y has 5"),
        ({}, {"epochs": -1}, "epochs"),
        ({}, {"batch_size": 0}, "batch_size"),
        ({}, {"validation_split": 1.5}, "validation_split"),
    ],
)
def test_bad_input_fails_before_training(tiny_data, kwargs, fit_kwargs, message):
    x, y = tiny_data
    recorder = RecordingPlugin()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        if "model" in kwargs:
            corebus.Trainer(kwargs["model"], loss="mse")
        trainer = make_trainer([recorder] + list(kwargs.pop("plugins", [])), **kwargs)
        trainer.fit(x, fit_kwargs.pop("y", y), **{"verbose": 0, **fit_kwargs})
    assert recorder.events == []


def test_profile_and_describe(tiny_data):
    x, y = tiny_data
    trainer = make_trainer([RecordingPlugin()], profile=True)
    plan = trainer.describe(verbose=0)
    assert "on_train_batch_end" in plan and "RecordingPlugin" in plan and "history [trylast]" in plan
    trainer.fit(x, y, batch_size=32, epochs=2, verbose=0)
    report = trainer.bus.profile_report()
    assert report["RecordingPlugin"]["on_train_batch_end"]["calls"] == 6


def test_a_configured_progress_bar_is_not_doubled(tiny_data):
    import io

    from corebus.plugins import ProgressBar

    x, y = tiny_data
    stream = io.StringIO()
    trainer = make_trainer([ProgressBar(stream=stream)])
    trainer.fit(x, y, batch_size=32, epochs=2, verbose=1)
    assert [n for n in trainer.bus.plugins if "Progress" in n or n == "progress"] == ["ProgressBar"]
    assert stream.getvalue().count("Epoch 2/2") == 1


def test_a_custom_step_calling_only_the_parts_leaves_a_saveable_model(tmp_path):
    """Keras marks a subclassed model built only when it is called; a GAN step calls its halves."""
    gan = corebus.testing.tiny_gan()

    def step(trainer, data):
        real, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(gan.discriminator(gan.generator(tf.random.normal((tf.shape(real)[0], 4))))))
        trainer.apply_gradients(
            tape.gradient(loss, gan.generator.trainable_variables),
            gan.generator.trainable_variables,
            optimizer="generator",
        )
        return {"g_loss": loss}

    trainer = corebus.Trainer(
        gan,
        optimizer={"generator": "adam"},
        train_step=step,
        plugins=[
            {
                "name": "checkpoint",
                "filepath": str(tmp_path / "e{epoch}.weights.h5"),
                "monitor": "g_loss",
                "save_weights_only": True,
            }
        ],
    )
    assert not gan.built
    trainer.fit(np.zeros((32, 2), "float32"), batch_size=8, epochs=1, verbose=0)
    restored = corebus.testing.tiny_gan(seed=1)
    restored(tf.zeros((1, 4)))
    restored.load_weights(tmp_path / "e1.weights.h5")
    for ours, theirs in zip(gan.weights, restored.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
