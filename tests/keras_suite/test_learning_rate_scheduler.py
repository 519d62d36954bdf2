"""LearningRateScheduler (corebus: lr_schedule, per="epoch"), following
keras/src/callbacks/learning_rate_scheduler_test.py (see README.md)."""

import keras
import pytest
from suite import compiled, four, run

from corebus.plugins.lr_schedule import LRSchedule

WAYS = ("keras_in_trainer", "adapter", "engine")


def halving(epoch, lr):  # depends on the previous learning rate, as one of Keras's cases
    return lr * 0.5 if epoch else lr


def by_epoch(epoch):
    return 0.1 / (epoch + 1)


@pytest.mark.parametrize("schedule", [by_epoch, halving])
def test_updates_the_learning_rate_and_history_records_it(schedule):
    runs = four(
        lambda: keras.callbacks.LearningRateScheduler(schedule),
        lambda: LRSchedule(schedule, per="epoch"),
        epochs=3,
        model_fn=lambda: compiled(lr=0.1),
    )
    theirs = runs["keras"].history.history["learning_rate"]
    for way in WAYS:
        assert runs[way].history.history["learning_rate"] == pytest.approx(theirs), way
        assert float(runs[way].model.optimizer.learning_rate) == pytest.approx(
            float(runs["keras"].model.optimizer.learning_rate)
        ), way


def test_verbose_message(capsys):
    outputs = {}
    for way in ("keras", *WAYS):
        make = (
            (lambda: keras.callbacks.LearningRateScheduler(by_epoch, verbose=1))
            if way.startswith("keras")
            else (lambda: LRSchedule(by_epoch, per="epoch", verbose=1))
        )
        run(way, make, epochs=2)
        outputs[way] = capsys.readouterr().out
    assert "LearningRateScheduler setting learning rate to" in outputs["keras"]
    assert outputs["keras_in_trainer"] == outputs["keras"]
    for way in ("adapter", "engine"):  # the plugin names itself
        assert outputs[way] == outputs["keras"].replace("LearningRateScheduler", "LRSchedule"), way


def test_optimizer_with_a_schedule():
    def scheduled():
        return compiled(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)))

    oracle = run("keras", lambda: keras.callbacks.LearningRateScheduler(by_epoch), model_fn=scheduled, raises=TypeError)
    assert isinstance(oracle.error, TypeError)
    inside = run(
        "keras_in_trainer",
        lambda: keras.callbacks.LearningRateScheduler(by_epoch),
        model_fn=scheduled,
        raises=Exception,
    )
    assert inside.error is not None  # the same callback cannot apply in the engine either
    for way in ("adapter", "engine"):
        r = run(way, lambda: LRSchedule(by_epoch, per="epoch"), model_fn=scheduled, raises=Exception)
        assert r.error is not None and "schedule" in str(r.error).lower(), way
