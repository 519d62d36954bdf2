"""Arguments of docs/moving-from-model-fit.md where the engine does not yet do what model.fit
does, checked against model.fit on the same data."""

import keras
import numpy as np
import pytest

import corebus
from corebus import ConfigError
from corebus.testing import tiny_data


class BatchRecorder(keras.Model):
    """Records the rows of every training batch (run eagerly), training nothing."""

    seen: list

    def train_step(self, data):
        x, _ = data
        self.seen.append(sorted(np.asarray(x)[:, 0].tolist()))
        return {"rows": float(x.shape[0])}


def recorded_batches(train, shuffle):
    x, labels = tiny_data(n=48)
    y = np.eye(3, dtype="float32")[labels]
    inputs = keras.Input((4,))
    model = BatchRecorder(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    model.seen = []
    train(model)(x, y, batch_size=16, epochs=2, shuffle=shuffle, verbose=0)
    chunks = [sorted(x[i : i + 16, 0].tolist()) for i in range(0, 48, 16)]
    return model.seen, chunks


def test_keras_shuffle_batch_keeps_batch_sized_chunks():
    seen, chunks = recorded_batches(lambda m: m.fit, "batch")
    assert seen == chunks * 2  # Keras (TF backend): each batch holds its chunk's rows, shuffled inside


def test_shuffle_batch_keeps_batch_sized_chunks_as_in_model_fit():
    ours, _ = recorded_batches(lambda m: corebus.Trainer(m).fit, "batch")
    theirs, _ = recorded_batches(lambda m: m.fit, "batch")
    assert ours == theirs


def test_validation_split_with_a_generator_names_the_fix():
    x, y = tiny_data(n=64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")

    def batches():
        while True:
            for i in range(0, 64, 16):
                yield x[i : i + 16], y[i : i + 16]

    with pytest.raises(ConfigError, match="validation_data"):
        corebus.Trainer(model).fit(batches(), steps_per_epoch=4, validation_split=0.2, verbose=0)
