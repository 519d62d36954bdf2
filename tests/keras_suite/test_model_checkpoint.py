"""ModelCheckpoint (corebus: checkpoint), following keras/src/callbacks/model_checkpoint_test.py
(see README.md).

Each case runs four ways (``suite.ALL_WAYS``), each in its own directory, and compares the files
a run leaves with those of Keras's ModelCheckpoint in ``model.fit`` on the same run.
"""

import logging
import warnings

import keras
import numpy as np
import pytest
from suite import ALL_WAYS, WAYS, files_in, fit_with

from corebus import ConfigError
from corebus.plugins.checkpoint import ModelCheckpoint
from corebus.testing import tiny_data

x_all, labels = tiny_data(n=60, features=3)
Y_ALL = keras.utils.to_categorical(labels, 3)
X, Y, X_VAL, Y_VAL = x_all[:30], Y_ALL[:30], x_all[30:], Y_ALL[30:]


def classifier(metrics=None, functional=False):
    keras.utils.set_random_seed(42)
    if functional:
        inputs = keras.Input((3,), batch_size=5)
        hidden = keras.layers.Dense(5, activation="relu")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    else:  # Keras's idiom: no Input, built by the first batch
        model = keras.Sequential(
            [keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3, activation="softmax")]
        )
    model.compile(
        loss="categorical_crossentropy",
        optimizer="sgd",
        metrics=metrics or [keras.metrics.CategoricalAccuracy(name="acc")],
    )
    return model


def checkpoint(way, path, **kwargs):
    return (keras.callbacks.ModelCheckpoint if way.startswith("keras") else ModelCheckpoint)(str(path), **kwargs)


def fit(way, model, callback, **kwargs):
    kwargs = {"batch_size": 5, "validation_data": (X_VAL, Y_VAL), "epochs": 1, **kwargs}
    key = "callbacks" if way.startswith("keras") else "plugins"
    return fit_with(way, model, X, Y, **{key: [callback]}, **kwargs)


def files_of_every_way(tmp_path, name, model_fn=classifier, **kwargs):
    """{way: files left in its directory} for one checkpoint configuration and fit."""
    fit_kwargs = {k: kwargs.pop(k) for k in ("epochs", "batch_size") if k in kwargs}
    files = {}
    for way in ALL_WAYS:
        fit(way, model_fn(), checkpoint(way, tmp_path / way / name, **kwargs), **fit_kwargs)
        files[way] = files_in(tmp_path / way)
    return files


@pytest.mark.parametrize(
    "monitor, mode, save_best_only",
    [("val_loss", "auto", False), ("val_loss", "min", False), ("val_acc", "max", False), ("val_acc", "max", True)],
)
def test_saves_into_a_new_subdirectory_whatever_the_monitor_and_mode(tmp_path, monitor, mode, save_best_only):
    files = files_of_every_way(
        tmp_path, "subdir/checkpoint.keras", monitor=monitor, mode=mode, save_best_only=save_best_only
    )
    assert files["keras"] == ["subdir/checkpoint.keras"]
    for way in WAYS:
        assert files[way] == files["keras"], way


@pytest.mark.parametrize("monitor, mode", [("val_loss", "auto"), ("val_acc", "max")])
def test_save_best_only_saves_the_same_epochs(tmp_path, monitor, mode):
    keras.utils.set_random_seed(0)
    files = files_of_every_way(
        tmp_path, "ckpt.{epoch:02d}.keras", monitor=monitor, mode=mode, save_best_only=True, epochs=6
    )
    assert files["keras"]  # the first epoch always improves on nothing
    for way in WAYS:
        assert files[way] == files["keras"], way


@pytest.mark.parametrize("way", ALL_WAYS)
def test_a_missing_monitor_warns_and_saves(tmp_path, way, caplog):
    path = tmp_path / "checkpoint.keras"
    callback = checkpoint(way, path, monitor="unknown", save_best_only=True, mode="min")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "corebus"):
        warnings.simplefilter("always")
        fit(way, classifier(), callback)
    # Keras warns with warnings.warn, the plugin through the "corebus" logger (README.md)
    said = [str(w.message) for w in caught] if way.startswith("keras") else [r.getMessage() for r in caplog.records]
    assert any("unknown" in message for message in said), said
    assert path.exists()


def test_an_unknown_mode():
    with pytest.warns(UserWarning, match="ModelCheckpoint mode 'unknown' is unknown"):
        keras.callbacks.ModelCheckpoint("m.keras", mode="unknown")
    # the plugin refuses it before training (README.md: bad input is an error, not a fallback)
    with pytest.raises(ConfigError, match="mode='unknown' is unknown; use one of auto, min, max"):
        ModelCheckpoint("m.keras", mode="unknown")


@pytest.mark.parametrize("name", ["checkpoint.epoch{epoch:02d}.keras", "checkpoint.epoch{epoch:02d}.weights.h5"])
def test_an_integer_save_freq_saves_every_n_batches(tmp_path, name):
    # 30 rows in batches of 6: 5 batches an epoch, so a save every third epoch
    files = files_of_every_way(
        tmp_path,
        name,
        monitor="val_acc",
        save_freq=15,
        epochs=10,
        batch_size=6,
        save_weights_only=name.endswith(".weights.h5"),
    )
    assert files["keras"] == [name.format(epoch=e) for e in (3, 6, 9)]
    for way in WAYS:
        assert files[way] == files["keras"], way


def test_save_freq_must_be_epoch_or_an_integer():
    with pytest.raises(ValueError, match="Unrecognized save_freq"):
        keras.callbacks.ModelCheckpoint("m.weights.h5", save_weights_only=True, save_freq="invalid_save_freq")
    with pytest.raises(ValueError, match="save_freq='invalid_save_freq'; use 'epoch' or a positive number"):
        ModelCheckpoint("m.weights.h5", save_weights_only=True, save_freq="invalid_save_freq")
    for save_freq in ("epoch", 3):  # accepted by both
        keras.callbacks.ModelCheckpoint("m.weights.h5", save_weights_only=True, save_freq=save_freq)
        ModelCheckpoint("m.weights.h5", save_weights_only=True, save_freq=save_freq)


@pytest.mark.parametrize(
    "name",
    ["checkpoint.epoch{epoch:02d}batch{batch:02d}.keras", "checkpoint.epoch{epoch:02d}batch{batch:02d}.weights.h5"],
)
def test_the_batch_in_the_file_name(tmp_path, name):
    # 30 rows in batches of 15: two batches an epoch, a save after each
    files = files_of_every_way(
        tmp_path,
        name,
        monitor="val_loss",
        save_freq=1,
        epochs=5,
        batch_size=15,
        save_weights_only=name.endswith(".weights.h5"),
    )
    assert files["keras"] == sorted(name.format(epoch=e, batch=b) for e in range(1, 6) for b in (1, 2))
    for way in WAYS:
        assert files[way] == files["keras"], way


@pytest.mark.parametrize(
    "monitor, mode, threshold, saved",
    [
        ("val_acc", "max", -0.01, True),  # any accuracy beats -0.01
        ("val_loss", "auto", None, True),
        ("val_loss", "min", 0, False),  # no loss beats 0
        ("val_loss", "auto", 0, False),
        ("val_auc", "auto", 1, False),  # auto: an AUC is maximised, and none beats 1
    ],
)
def test_initial_value_threshold(tmp_path, monitor, mode, threshold, saved):
    metrics = [keras.metrics.AUC(name="auc")] if monitor == "val_auc" else None
    files = files_of_every_way(
        tmp_path,
        "checkpoint.keras",
        model_fn=lambda: classifier(metrics),
        monitor=monitor,
        mode=mode,
        save_best_only=True,
        initial_value_threshold=threshold,
    )
    assert files["keras"] == (["checkpoint.keras"] if saved else [])
    for way in WAYS:
        assert files[way] == files["keras"], way


@pytest.mark.parametrize("way", ALL_WAYS)
@pytest.mark.parametrize("weights_only", [False, True])
def test_a_saved_file_loads_with_the_trained_weights(tmp_path, way, weights_only):
    path = tmp_path / ("checkpoint.weights.h5" if weights_only else "checkpoint.model.keras")
    model = classifier(functional=True)
    fit(way, model, checkpoint(way, path, monitor="val_loss", save_best_only=True, save_weights_only=weights_only))
    if weights_only:
        loaded = classifier(functional=True)
        loaded.load_weights(path)
    else:
        loaded = keras.saving.load_model(path)
    for mine, theirs in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(theirs, mine)
