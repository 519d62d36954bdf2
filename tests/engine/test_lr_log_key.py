"""One rule for the learning rate's log key, wherever the key is written.

The engine writes each optimizer's learning rate into the epoch's ``on_log`` record under
``trainer.learning_rate_key(name)``: ``learning_rate`` when the run has one optimizer, whatever its
name, ``learning_rate/<name>`` for each of several. ``LRSchedule`` and ``ReduceLROnPlateau`` write
the same value into the epoch logs (``history``, CSV, the monitor). They keyed on the name
``"default"`` instead, so a custom step with one optimizer named ``generator`` logged the rate
twice (``learning_rate`` and ``learning_rate/generator``), and a run with optimizers ``default``
and ``critic`` logged ``learning_rate`` beside ``learning_rate/default``.
"""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

import corebus
from corebus import hookimpl
from corebus.plugins import LRSchedule, ReduceLROnPlateau
from corebus.testing import tiny_data, tiny_model

EPOCHS = 2


class EpochRecords:
    """The keys of every epoch ``on_log`` record (what the loggers write)."""

    def __init__(self):
        self.keys: list[set[str]] = []
        self.values: list[dict[str, float]] = []

    @hookimpl
    def on_log(self, kind, logs):
        if kind == "epoch":
            self.keys.append({k for k in logs if k.startswith("learning_rate")})
            self.values.append({k: logs[k] for k in self.keys[-1]})


def fit_named(names: list[str], plugins: list) -> tuple[corebus.Trainer, dict]:
    """A custom step whose optimizers have the given names (the first one applies the gradients)."""
    model = tiny_model()
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def step(trainer, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        trainer.apply_gradients(
            tape.gradient(loss, model.trainable_variables), model.trainable_variables, optimizer=names[0]
        )
        return {"loss": loss}

    optimizers = {name: keras.optimizers.SGD(0.1) for name in names}
    trainer = corebus.Trainer(model, optimizer=optimizers, train_step=step, plugins=plugins, seed=0)
    x, y = tiny_data()
    history = trainer.fit(x, y, batch_size=32, epochs=EPOCHS, shuffle=False, verbose=0)
    return trainer, history.history


@pytest.mark.parametrize("names", [["generator"], ["default", "critic"]], ids=["one_named", "default_and_another"])
@pytest.mark.parametrize("plugin", ["lr_schedule", "reduce_lr_on_plateau"])
def test_plugins_and_engine_key_the_learning_rate_alike(plugin, names):
    make = {
        "lr_schedule": lambda: LRSchedule("step", initial_learning_rate=0.1, drop=0.5, epochs_drop=1),
        "reduce_lr_on_plateau": lambda: ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=100.0),
    }[plugin]
    records = EpochRecords()
    trainer, history = fit_named(names, [make(), records])
    expected = {trainer.learning_rate_key(name) for name in names}
    assert expected == ({"learning_rate"} if len(names) == 1 else {f"learning_rate/{n}" for n in names})
    # The epoch logs (history) and the loggers' epoch records carry the same keys, each once.
    assert {k for k in history if k.startswith("learning_rate")} == expected
    assert records.keys == [expected] * EPOCHS
    # One value per key: what the plugin wrote is what the loggers get.
    for key in expected:
        assert [v[key] for v in records.values] == history[key]


def test_installed_schedule_is_the_public_view_of_the_optimizers_schedule():
    """What LRSchedule compares to see whether its schedule is still in place (it read the
    optimizer's private ``_learning_rate`` before)."""
    trainer = corebus.Trainer(tiny_model(), optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    lr = trainer.lr
    assert lr.installed_schedule is None
    lr.set_schedule(keras.optimizers.schedules.ExponentialDecay(0.1, 5, 0.5), owner="test")
    installed = lr.installed_schedule
    assert isinstance(installed, corebus.kit.ScaledSchedule)
    assert trainer.optimizer.learning_rate is not None and lr.installed_schedule is installed
    lr.set_schedule(keras.optimizers.schedules.ExponentialDecay(0.1, 5, 0.9), owner="test")
    assert lr.installed_schedule is not installed
