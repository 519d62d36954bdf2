"""CSVLogger, following keras/src/callbacks/csv_logger_test.py (see README.md).

Every behaviour is checked four ways on the same run: Keras's CSVLogger in ``model.fit`` (the
oracle), the same callback in ``corebus.Trainer(model).fit(callbacks=)``, and the ``csv_logger``
plugin through ``corebus.KerasCallback`` and in ``corebus.Trainer``. The files are compared cell
by cell with the oracle's (same header, same rows, same ``NA`` cells, numbers within float32
rounding of each other).
"""

import csv

import keras
import numpy as np
import pytest
from suite import ALL_WAYS, WAYS, fit_with

from corebus.plugins.csv_logger import CSVLogger
from corebus.plugins.terminate_on_nan import TerminateOnNaN

rng = np.random.default_rng(1337)
X, Y = rng.random((10, 3)).astype("float32"), rng.random((10, 1)).astype("float32")
X_VAL, Y_VAL = rng.random((10, 3)).astype("float32"), rng.random((10, 1)).astype("float32")


def regression():
    # Keras's idiom: a Sequential without an Input, built by its first batch.
    keras.utils.set_random_seed(1337)
    model = keras.Sequential([keras.layers.Dense(2, activation="relu"), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd", metrics=["mse"])
    return model


def logger(way, path, **kwargs):
    return (keras.callbacks.CSVLogger if way.startswith("keras") else CSVLogger)(str(path), **kwargs)


def fit(way, model, obj, **kwargs):
    kwargs = {"batch_size": 4, "validation_data": (X_VAL, Y_VAL), "epochs": 1, **kwargs}
    key = "callbacks" if way.startswith("keras") else "plugins"
    return fit_with(way, model, X, Y, **{key: obj if isinstance(obj, list) else [obj]}, **kwargs)


def cells(path, sep=","):
    with open(path, newline="") as f:
        return [row for row in csv.reader(f, delimiter=sep) if row]


def same_file(path, oracle, sep=","):
    ours, theirs = cells(path, sep), cells(oracle, sep)
    assert len(ours) == len(theirs) and ours[0] == theirs[0], (ours, theirs)
    for row, expected in zip(ours[1:], theirs[1:]):
        assert len(row) == len(expected)
        for cell, want in zip(row, expected):
            if _finite(cell) and _finite(want):
                assert float(cell) == pytest.approx(float(want), rel=1e-5), (row, expected)
            else:  # NA, nan, inf, the epoch column's text
                assert cell == want, (row, expected)


def _finite(text):
    try:
        return bool(np.isfinite(float(text)))
    except ValueError:
        return False


def test_a_new_file_with_the_given_separator(tmp_path):
    for way in ALL_WAYS:
        fit(way, regression(), logger(way, tmp_path / f"{way}.tsv", separator="\t"))
        with open(tmp_path / f"{way}.tsv") as f:
            assert csv.Sniffer().sniff(f.read()).delimiter == "\t", way
    for way in WAYS:
        same_file(tmp_path / f"{way}.tsv", tmp_path / "keras.tsv", sep="\t")
    assert len(cells(tmp_path / "keras.tsv", "\t")) == 2  # a header and one epoch


def test_append_skips_the_header_and_a_reused_logger_appends(tmp_path):
    for way in ALL_WAYS:
        path = tmp_path / f"{way}.tsv"
        fit(way, regression(), logger(way, path, separator="\t"))  # a file with a header and a row
        model, appending = regression(), logger(way, path, separator="\t", append=True)
        fit(way, model, appending)  # appends one row, no second header
        fit(way, model, appending, epochs=2)  # the same logger object again: two rows more
        with open(path) as f:
            lines = f.readlines()
        assert len(lines) == 5, (way, lines)
        assert all(line.count("\t") == 4 for line in lines), way
        assert " ".join(lines).count("epoch") == 1, way
    for way in WAYS:
        same_file(tmp_path / f"{way}.tsv", tmp_path / "keras.tsv", sep="\t")


def test_epochs_without_validation_say_NA(tmp_path):
    for way in ALL_WAYS:
        path = tmp_path / f"{way}.tsv"
        history = fit(way, regression(), logger(way, path, separator="\t"), validation_freq=3, epochs=5)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert len(rows) == 5, way
        for epoch, row in enumerate(rows, 1):
            expected = str(history.history["val_loss"][0]) if epoch == 3 else "NA"
            assert row["val_loss"] == expected, (way, epoch, row)
    for way in WAYS:
        same_file(tmp_path / f"{way}.tsv", tmp_path / "keras.tsv", sep="\t")


def exploding():
    # Huge constant weights: the first batch's loss is not finite.
    keras.utils.set_random_seed(1337)
    big = keras.initializers.Constant(1e5)
    model = keras.Sequential(
        [keras.layers.Dense(2, activation="relu", kernel_initializer=big) for _ in range(5)] + [keras.layers.Dense(2)]
    )
    model.compile(loss="mean_squared_error", optimizer="sgd")
    return model


@pytest.mark.parametrize("way", ALL_WAYS)
def test_a_stop_by_terminate_on_nan_leaves_a_valid_file_with_the_nan_row(tmp_path, way):
    labels = keras.utils.to_categorical(rng.integers(0, 2, 10), 2)
    val_labels = keras.utils.to_categorical(rng.integers(0, 2, 10), 2)
    path = tmp_path / "log.csv"
    stop = keras.callbacks.TerminateOnNaN() if way.startswith("keras") else TerminateOnNaN()
    key = "callbacks" if way.startswith("keras") else "plugins"
    history = fit_with(
        way,
        exploding(),
        X,
        labels,
        batch_size=4,
        validation_data=(X_VAL, val_labels),
        epochs=20,
        **{key: [stop, logger(way, path)]},
    )
    loss = history.history["loss"]
    assert len(loss) == 1 and not np.isfinite(loss[0])
    rows = cells(path)
    assert len(rows) == 2 and rows[0][0] == "epoch"
    assert "nan" in rows[-1], rows
