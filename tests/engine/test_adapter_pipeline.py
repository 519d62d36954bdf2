"""KerasCallback and the gradient pipeline inside model.fit, against plain Keras on the same run:
unbuilt models, optimizers the user did not wrap, and saved models that load without corebus."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import corebus
from corebus import CorebusError, hookimpl
from corebus.plugins import EarlyStopping, GradientClipping
from corebus.testing import RecordingPlugin, tiny_data

X, Y = tiny_data()
FIT = {"batch_size": 16, "shuffle": False, "verbose": 0}


def unbuilt_model():
    """The common Keras idiom: a Sequential without an Input, built by its first step."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3, activation="softmax")])


def compiled(model, optimizer):
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def assert_weights_equal(a, b, atol=1e-6):
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=atol)


class NormReader:
    """Reads the gradient norm tap on every batch record."""

    gradient_taps = {"norm"}

    def __init__(self):
        self.norms = []

    @hookimpl
    def on_log(self, kind, logs):
        if kind == "batch":
            self.norms.append(float(logs["grad_norm"]))


def test_unbuilt_sequential_with_gradient_plugins_matches_keras():
    # corebus: plain "adam" (no wrap_optimizer), clipping from the plugin, two fits in a row
    recorder = RecordingPlugin()
    callback = corebus.KerasCallback(
        [GradientClipping(global_norm=0.05), EarlyStopping(monitor="loss", patience=5), recorder]
    )
    model = compiled(unbuilt_model(), "adam")
    assert not model.built
    model.fit(X, Y, epochs=2, validation_split=0.25, callbacks=[callback], **FIT)
    model.fit(X, Y, epochs=1, callbacks=[callback], **FIT)
    # Keras: its own global_clipnorm, the same two fits
    reference = compiled(unbuilt_model(), keras.optimizers.Adam(global_clipnorm=0.05))
    reference.fit(X, Y, epochs=2, validation_split=0.25, **FIT)
    reference.fit(X, Y, epochs=1, **FIT)
    assert_weights_equal(model.get_weights(), reference.get_weights())
    assert int(model.optimizer.iterations.numpy()) == int(reference.optimizer.iterations.numpy()) == 2 * 5 + 6
    assert recorder.names().count("on_train_begin") == 2
    # The model keeps its own optimizer between fits; a fit without the callback is plain Keras.
    assert type(model.optimizer) is keras.optimizers.Adam
    plain, keras_plain = compiled(unbuilt_model(), "adam"), compiled(unbuilt_model(), "adam")
    plain.fit(X, Y, epochs=1, callbacks=[corebus.KerasCallback(["early_stopping"])], **FIT)
    keras_plain.fit(X, Y, epochs=1, **FIT)
    assert_weights_equal(plain.get_weights(), keras_plain.get_weights())


def test_gradient_plugins_run_without_wrap_optimizer():
    reader = NormReader()
    callback = corebus.KerasCallback([GradientClipping(global_norm=1e-6), reader])
    model = compiled(unbuilt_model(), "sgd")
    model.fit(X, Y, epochs=1, callbacks=[callback], **FIT)
    reference = compiled(unbuilt_model(), keras.optimizers.SGD(global_clipnorm=1e-6))
    reference.fit(X, Y, epochs=1, **FIT)
    assert_weights_equal(model.get_weights(), reference.get_weights(), atol=1e-9)
    # the tap measured each update's norm before clipping (not 1e-6)
    assert len(reader.norms) == 6 and min(reader.norms) > 0.01
    # A later fit without the callback is plain Keras again (the clipping was traced away).
    reference = compiled(unbuilt_model(), "sgd")
    reference.build((None, 4))
    reference.set_weights(model.get_weights())
    model.fit(X, Y, epochs=1, **FIT)
    reference.fit(X, Y, epochs=1, **FIT)
    assert_weights_equal(model.get_weights(), reference.get_weights())


def test_norm_tap_without_updates_through_the_optimizer_is_a_clear_error():
    class OwnStep(keras.Sequential):
        def train_step(self, data):  # applies its update without model.optimizer
            x, y = data
            for v in self.trainable_variables:
                v.assign(v * 0.99)
            return {"loss": keras.ops.mean(self(x))}

    keras.utils.set_random_seed(3)
    model = OwnStep([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(CorebusError, match=r"gradient_taps=\{.norm.\} cannot run.*self.optimizer.apply"):
        model.fit(X, Y, epochs=1, callbacks=[corebus.KerasCallback([NormReader()])], **FIT)


LOAD_WITHOUT_COREBUS = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    x = np.load(sys.argv[1])
    out = {}
    for path in sys.argv[2:]:
        model = keras.saving.load_model(path)
        out[path] = {
            "predictions": model.predict(x, verbose=0).tolist(),
            "optimizer": type(model.optimizer).__name__,
            "optimizer_variables": [v.numpy().tolist() for v in model.optimizer.variables],
        }
    out["corebus_imported"] = any(name.split(".")[0] == "corebus" for name in sys.modules)
    print(json.dumps(out))
""")


def test_model_trained_with_wrap_optimizer_saves_a_file_plain_keras_loads(tmp_path):
    callback = corebus.KerasCallback([GradientClipping(global_norm=0.05)])
    model = compiled(unbuilt_model(), callback.wrap_optimizer("adam"))
    during = str(tmp_path / "during_fit.keras")  # saved by Keras's callback while the wrapper is in place
    model.fit(X, Y, epochs=2, callbacks=[callback, keras.callbacks.ModelCheckpoint(during)], **FIT)
    after = str(tmp_path / "after_fit.keras")
    model.save(after)
    np.save(tmp_path / "x.npy", X)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_COREBUS, str(tmp_path / "x.npy"), during, after],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded.pop("corebus_imported") is False
    expected = model.predict(X, verbose=0)
    for path in (during, after):
        assert loaded[path]["optimizer"] == "Adam"
        np.testing.assert_allclose(loaded[path]["predictions"], expected, rtol=1e-6, atol=1e-7)
        variables = loaded[path]["optimizer_variables"]
        assert len(variables) == len(model.optimizer.variables)
        for got, want in zip(variables, model.optimizer.variables):
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-8)
    assert "skipping" not in run.stderr.lower(), run.stderr[-3000:]
