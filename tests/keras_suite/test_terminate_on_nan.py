"""TerminateOnNaN, following keras/src/callbacks/terminate_on_nan_test.py (see README.md)."""

import keras
import numpy as np
import pytest
from suite import compiled, run

from corebus.plugins.terminate_on_nan import TerminateOnNaN

WAYS = ("keras_in_trainer", "adapter", "engine")
X = np.array([[1.0], [2.0], [3.0], [4.0]], "float32")
Y_INF_SECOND = np.array([[1.0], [np.inf], [1.0], [1.0]], "float32")  # the second batch is infinite


def regression():
    keras.utils.set_random_seed(0)
    return compiled(loss="mse", metrics=(), model=keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))


class EndSpy(keras.callbacks.Callback):
    ended = False

    def on_train_end(self, logs=None):
        EndSpy.ended = True


def make(way, **kwargs):
    return (
        (lambda: keras.callbacks.TerminateOnNaN(**kwargs))
        if way.startswith("keras")
        else (lambda: TerminateOnNaN(**kwargs))
    )


@pytest.mark.parametrize("way", ["keras", *WAYS])
def test_stops_gracefully_and_ends_training(way):
    EndSpy.ended = False
    r = run(way, make(way), x=X, y=Y_INF_SECOND, batch_size=1, epochs=5, model_fn=regression, extra=lambda: [EndSpy()])
    assert r.error is None and r.epochs == [0] and not np.isfinite(r.history.history["loss"][0])
    assert EndSpy.ended  # a graceful stop still ends training


@pytest.mark.parametrize("way", ["keras", *WAYS])
def test_raise_error_raises_at_the_bad_batch_and_skips_train_end(way):
    EndSpy.ended = False
    r = run(
        way,
        make(way, raise_error=True),
        x=X,
        y=Y_INF_SECOND,
        batch_size=1,
        epochs=2,
        model_fn=regression,
        extra=lambda: [EndSpy()],
        raises=Exception,
    )
    assert r.error is not None and "batch 1" in str(r.error)
    assert not EndSpy.ended


@pytest.mark.parametrize("way", ["keras", *WAYS])
def test_finite_training_does_not_stop(way):
    y = np.ones((4, 1), "float32")
    r = run(way, make(way, raise_error=True), x=X, y=y, batch_size=2, epochs=3, model_fn=regression)
    assert r.error is None and r.epochs == [0, 1, 2]
