"""GradientClipping against Keras's own optimizer clipping (global_clipnorm / clipnorm / clipvalue)."""

import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError, CorebusError
from corebus.plugins import GradientClipping
from corebus.testing import fit_both_ways, make_trainer, tiny_data, tiny_gan, tiny_model

KERAS_OPTIMIZERS = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}
# Thresholds well below the tiny model's gradient norm (~0.6), so clipping acts on every step.
MODES = [("global_norm", "global_clipnorm", 0.05), ("norm", "clipnorm", 0.05), ("value", "clipvalue", 0.005)]
FIT = {"batch_size": 16, "epochs": 2}


def keras_weights(x, y, optimizer):
    model = tiny_model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, shuffle=False, verbose=0, **FIT)
    return model.get_weights()


@functools.cache
def unclipped_weights(optimizer):
    # The tiny_data fixture is corebus.testing.tiny_data(): one unclipped run per optimizer.
    return keras_weights(*tiny_data(), optimizer)


def assert_weights_equal(a, b, atol=1e-6):
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=atol)


def max_difference(a, b):
    return max(float(np.max(np.abs(wa - wb))) for wa, wb in zip(a, b, strict=True))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("mode, keras_name, threshold", MODES)
def test_same_weights_as_keras_optimizer_clipping(tiny_data, mode, keras_name, threshold, optimizer):
    x, y = tiny_data
    (engine, engine_history), (keras_plugins, keras_history) = fit_both_ways(
        lambda: [GradientClipping(**{mode: threshold}, log_norm=True)], x, y, optimizer=optimizer, **FIT
    )
    reference = keras_weights(x, y, KERAS_OPTIMIZERS[optimizer](**{keras_name: threshold}))
    assert_weights_equal(engine_history.model.get_weights(), reference)
    assert_weights_equal(keras_history.model.get_weights(), reference)
    # The threshold really bites: without clipping the weights end elsewhere.
    assert max_difference(unclipped_weights(optimizer), reference) > 1e-3
    for plugins in (engine, keras_plugins):
        assert plugins[0].last_norm > 0.1 > threshold


@pytest.mark.parametrize("mode", ["global_norm", "norm", "value"])
def test_transform_matches_the_clipping_formulas(mode):
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(5, 3)).astype("float32") * 4, None, rng.normal(size=(7,)).astype("float32")]
    gradients = [None if a is None else tf.constant(a) for a in arrays]
    clip = GradientClipping(**{mode: 0.5}, log_norm=True)
    out = clip.transform_gradients(gradients=gradients, optimizer_name="default")

    present = [a for a in arrays if a is not None]
    norm = float(np.sqrt(sum(np.sum(a.astype("float64") ** 2) for a in present)))
    if mode == "global_norm":
        expected = [None if a is None else a * 0.5 / norm for a in arrays]
        tf_clipped, tf_norm = tf.clip_by_global_norm(gradients, 0.5)
        for got, want in zip(out, tf_clipped):
            assert (got is None) == (want is None)
            if got is not None:
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
        assert float(tf_norm) == pytest.approx(norm, rel=1e-6)
    elif mode == "norm":
        expected = [None if a is None else a * 0.5 / max(0.5, np.linalg.norm(a)) for a in arrays]
    else:
        expected = [None if a is None else np.clip(a, -0.5, 0.5) for a in arrays]
    for got, want in zip(out, expected, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(out[0].numpy(), arrays[0])  # it did clip
    assert clip.last_norm == pytest.approx(norm, rel=1e-5)  # the norm before clipping


# ---------------------------------------------------------------- several optimizers


def two_optimizer_run(plugins, clip_generator_in_step=None):
    """A deterministic two-optimizer custom step; returns (generator, discriminator) weights.

    ``clip_generator_in_step`` clips the generator's gradients by hand inside the step: the
    reference for a plugin that clips only the generator.
    """
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(64, 4)).astype("float32")
    real = rng.normal(loc=2.0, size=(64, 2)).astype("float32")
    gan = tiny_gan()
    generator, discriminator = gan.generator, gan.discriminator

    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def gan_step(trainer, data):
        z, batch, _ = keras.utils.unpack_x_y_sample_weight(data)
        ones, zeros = tf.ones_like(batch[:, :1]), tf.zeros_like(batch[:, :1])
        with tf.GradientTape() as tape:
            d_loss = bce(ones, discriminator(batch)) + bce(zeros, discriminator(generator(z)))
        trainer.apply_gradients(
            tape.gradient(d_loss, discriminator.trainable_variables),
            discriminator.trainable_variables,
            optimizer="discriminator",
        )
        with tf.GradientTape() as tape:
            g_loss = bce(ones, discriminator(generator(z)))
        grads = tape.gradient(g_loss, generator.trainable_variables)
        if clip_generator_in_step is not None:
            grads, _ = tf.clip_by_global_norm(grads, clip_generator_in_step)
        trainer.apply_gradients(grads, generator.trainable_variables, optimizer="generator")
        return {"d_loss": d_loss, "g_loss": g_loss}

    trainer = corebus.Trainer(
        gan,
        optimizer={"discriminator": keras.optimizers.SGD(0.5), "generator": keras.optimizers.SGD(0.5)},
        train_step=gan_step,
        plugins=plugins,
        seed=0,
    )
    trainer.fit(noise, real, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return generator.get_weights(), discriminator.get_weights()


def test_clips_only_the_named_optimizer_in_a_custom_step():
    only_generator = GradientClipping(global_norm=0.05, optimizers=["generator"], log_norm=True)
    gen, disc = two_optimizer_run([only_generator])
    assert set(only_generator.last_norms) == {"generator"}  # the transform touched only the generator

    by_hand_gen, by_hand_disc = two_optimizer_run([], clip_generator_in_step=0.05)
    assert_weights_equal(gen, by_hand_gen)
    assert_weights_equal(disc, by_hand_disc)

    unclipped_gen, _ = two_optimizer_run([])
    assert max_difference(gen, unclipped_gen) > 1e-3  # clipping was active on the generator

    everything = GradientClipping(global_norm=0.05, log_norm=True)
    _, all_clipped_disc = two_optimizer_run([everything])
    assert set(everything.last_norms) == {"generator", "discriminator"}
    assert max_difference(disc, all_clipped_disc) > 1e-3  # so the discriminator was left alone above


# ---------------------------------------------------------------- state, config, bad input


def test_state_round_trip_and_a_resumed_instance_continues(tiny_data):
    x, y = tiny_data
    whole = GradientClipping(norm=0.05, log_norm=True)
    uninterrupted = make_trainer([whole])
    uninterrupted.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)

    first = GradientClipping(norm=0.05, log_norm=True)
    trainer = make_trainer([first])
    trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = GradientClipping(**json.loads(json.dumps(first.get_config())))
    resumed.load_state_dict(state)
    assert resumed.last_norm == first.last_norm > 0.05  # readable before the first resumed step

    # A fresh run from the epoch-1 weights (plain SGD has no slots to restore).
    model = tiny_model()
    model.set_weights(trainer.model.get_weights())
    make_trainer([resumed], model=model).fit(x, y, batch_size=16, epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    assert_weights_equal(model.get_weights(), uninterrupted.model.get_weights())
    assert resumed.last_norm == pytest.approx(whole.last_norm, rel=1e-6)
    assert resumed.last_norm != pytest.approx(state["last_norms"]["default"], rel=1e-6)


def test_config_and_repr_are_json_friendly():
    clip = GradientClipping(value=0.5, optimizers="generator", log_norm=True)
    config = clip.get_config()
    assert json.loads(json.dumps(config)) == {"value": 0.5, "optimizers": ["generator"], "log_norm": True}
    assert repr(clip) == "GradientClipping(value=0.5, optimizers=['generator'], log_norm=True)"
    assert repr(GradientClipping(**config)) == repr(clip)
    assert GradientClipping(global_norm=1).get_config() == {"global_norm": 1.0, "optimizers": None, "log_norm": False}
    assert GradientClipping(norm=1.0).state_dict() == {"last_norms": {}}
    assert json.dumps(GradientClipping(norm=np.float32(0.5)).get_config()) == (
        '{"norm": 0.5, "optimizers": null, "log_norm": false}'
    )


def test_activated_by_name_from_a_config_mapping(tiny_data):
    x, y = tiny_data
    trainer = make_trainer([{"name": "gradient_clipping", "global_norm": 0.05}])
    trainer.fit(x, y, verbose=0, shuffle=False, **FIT)
    assert "GradientClipping(global_norm=0.05)" in repr(trainer.bus.plugins)
    reference = keras_weights(x, y, keras.optimizers.SGD(global_clipnorm=0.05))
    assert_weights_equal(trainer.model.get_weights(), reference)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of global_norm= .* got none"),
        ({"global_norm": 1.0, "value": 0.5}, "exactly one of .* got global_norm, value"),
        ({"norm": 0.0}, r"norm=0.0 must be a finite number > 0"),
        ({"value": -1}, r"value=-1 must be a finite number > 0"),
        ({"global_norm": float("nan")}, r"global_norm=nan must be"),
        ({"global_norm": "1"}, r"global_norm='1' must be"),
        ({"norm": True}, r"norm=True must be"),
        ({"norm": 1.0, "optimizers": []}, "optimizers=.* non-empty list of names"),
        ({"norm": 1.0, "optimizers": [3]}, "optimizers=.* non-empty list of names"),
    ],
)
def test_bad_input_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GradientClipping(**kwargs)


def test_bad_params_by_name_and_two_clippers_fail_before_training():
    with pytest.raises(ConfigError, match="gradient_clipping.*rejected its params.*value=-1"):
        make_trainer([{"name": "gradient_clipping", "value": -1}])
    with pytest.raises(ConfigError, match="both control 'grads.clipping'"):
        make_trainer([GradientClipping(norm=1.0), {"name": "gradient_clipping", "value": 1.0}])


def test_unknown_optimizer_name_fails_before_any_step(tiny_data):
    x, y = tiny_data
    trainer = make_trainer([GradientClipping(norm=1.0, optimizers=["generater"])])
    before = [w.copy() for w in trainer.model.get_weights()]
    with pytest.raises(CorebusError) as err:
        trainer.fit(x, y, verbose=0, **FIT)
    # The bus wraps errors raised inside hooks in PluginError; the cause is the ConfigError.
    cause = err.value if isinstance(err.value, ConfigError) else err.value.__cause__
    assert isinstance(cause, ConfigError)
    assert "no optimizer named ['generater']; this run has ['default']" in str(cause)
    assert int(trainer.optimizer.iterations.numpy()) == 0
    assert_weights_equal(trainer.model.get_weights(), before, atol=0)


def embedding_model():
    keras.utils.set_random_seed(11)
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(50, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


@pytest.mark.parametrize(
    "mode, keras_name, threshold",
    [
        ("global_norm", "global_clipnorm", 100.0),
        ("global_norm", "global_clipnorm", 0.01),
        ("value", "clipvalue", 100.0),
        ("value", "clipvalue", 0.001),
        ("norm", "clipnorm", 0.01),
    ],
)
def test_sparse_gradients_match_keras_clipping(mode, keras_name, threshold):
    # An Embedding's gradient is sparse; Adam updates differ for sparse and dense gradients,
    # so this shows whether a clip densifies exactly when Keras's does (also when nothing clips).
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 50, size=(128, 5)).astype("int32")
    labels = (tokens[:, 0] % 3).astype("int32")
    fit = {"batch_size": 16, "epochs": 1, "shuffle": False, "verbose": 0}  # 8 steps
    reference = embedding_model()
    reference.compile(
        optimizer=keras.optimizers.Adam(**{keras_name: threshold}), loss="sparse_categorical_crossentropy"
    )
    reference.fit(tokens, labels, **fit)
    ours = embedding_model()
    ours.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    ours.fit(tokens, labels, callbacks=[corebus.KerasCallback([GradientClipping(**{mode: threshold})])], **fit)
    trainer = make_trainer(
        [GradientClipping(**{mode: threshold})], model=embedding_model(), optimizer="adam", metrics=[]
    )
    trainer.fit(tokens, labels, **fit)
    assert_weights_equal(ours.get_weights(), reference.get_weights())
    assert_weights_equal(trainer.model.get_weights(), reference.get_weights())
