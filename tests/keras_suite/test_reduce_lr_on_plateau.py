"""ReduceLROnPlateau, following keras/src/callbacks/reduce_lr_on_plateau_test.py (see README.md)."""

import keras
import pytest
from suite import compiled, four, run

from corebus.plugins.reduce_lr_on_plateau import ReduceLROnPlateau

WAYS = ("keras_in_trainer", "adapter", "engine")


def lrs(r):
    return [round(float(v), 8) for v in r.history.history["learning_rate"]]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(monitor="val_loss", factor=0.5, patience=1, min_delta=10.0),  # reduces with model.fit
        dict(monitor="val_loss", factor=0.1, patience=1, min_delta=10.0, min_lr=0.002),  # honours min_lr
        dict(monitor="val_loss", factor=0.5, patience=1, min_delta=10.0, cooldown=2),  # cooldown
    ],
    ids=["reduces", "min_lr", "cooldown"],
)
def test_learning_rate_trajectory(kwargs):
    runs = four(
        lambda: keras.callbacks.ReduceLROnPlateau(**kwargs),
        lambda: ReduceLROnPlateau(**kwargs),
        epochs=5,
        validation_split=0.25,
        model_fn=lambda: compiled(lr=0.1),
    )
    assert lrs(runs["keras"])[-1] < 0.1
    for way in WAYS:
        assert lrs(runs[way]) == lrs(runs["keras"]), way
        assert float(runs[way].model.optimizer.learning_rate) == pytest.approx(
            float(runs["keras"].model.optimizer.learning_rate)
        ), way


def test_optimizer_with_a_schedule():
    # Keras cannot change a scheduled optimizer's LR and raises; the plugin scales the schedule
    # (a documented difference, README.md "cannot apply").
    def scheduled():
        return compiled(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)))

    kwargs = dict(monitor="loss", factor=0.5, patience=0, min_delta=10.0)
    oracle = run("keras", lambda: keras.callbacks.ReduceLROnPlateau(**kwargs), model_fn=scheduled, raises=TypeError)
    assert isinstance(oracle.error, TypeError)
    for way in ("adapter", "engine"):
        r = run(way, lambda: ReduceLROnPlateau(**kwargs), model_fn=scheduled)
        assert r.error is None and lrs(r)[1] < lrs(r)[0]


def test_verbose_message(capsys):
    kwargs = dict(monitor="loss", factor=0.5, patience=0, min_delta=10.0, verbose=1)
    outputs = {}
    for way in ("keras", *WAYS):
        make = (
            (lambda: keras.callbacks.ReduceLROnPlateau(**kwargs))
            if way.startswith("keras")
            else (lambda: ReduceLROnPlateau(**kwargs))
        )
        run(way, make, epochs=2)
        outputs[way] = capsys.readouterr().out
    assert "ReduceLROnPlateau reducing learning rate to" in outputs["keras"]
    for way in WAYS:
        assert outputs[way] == outputs["keras"], way


def test_state_reset_across_fits():
    kwargs = dict(monitor="loss", factor=0.5, patience=2, min_delta=10.0)
    keras_cb, plugin = keras.callbacks.ReduceLROnPlateau(**kwargs), ReduceLROnPlateau(**kwargs)
    for _ in range(2):  # a stale wait from the first fit would reduce one epoch early in the second
        runs = four(lambda: keras_cb, lambda: plugin, epochs=2, model_fn=lambda: compiled(lr=0.1))
        for way in WAYS:
            assert lrs(runs[way]) == lrs(runs["keras"]) == [0.1, 0.1], way
