"""EarlyStopping, following keras/src/callbacks/early_stopping_test.py (see README.md)."""

import keras
import pytest
from suite import compiled, four, same_weights

from corebus.plugins.early_stopping import EarlyStopping
from corebus.testing import make_trainer, tiny_data  # noqa: F401 (tiny_data: a fixture)

WAYS = ("keras_in_trainer", "adapter", "engine")


@pytest.mark.parametrize("monitor, mode", [("loss", "min"), ("accuracy", "auto"), ("val_loss", "auto")])
def test_monitor_and_mode_decide_the_stop_epoch(monitor, mode):
    kwargs = dict(monitor=monitor, mode=mode, patience=1, min_delta=0.01)
    runs = four(
        lambda: keras.callbacks.EarlyStopping(**kwargs),
        lambda: EarlyStopping(**kwargs),
        epochs=8,
        validation_split=0.25,
        model_fn=lambda: compiled(lr=0.05),
    )
    for way in WAYS:
        assert runs[way].epochs == runs["keras"].epochs, way
        assert runs[way].obj.stopped_epoch == runs["keras"].obj.stopped_epoch, way


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_patience_on_a_loss_sequence(patience):
    losses = [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]
    keras_stopper = keras.callbacks.EarlyStopping(monitor="loss", patience=patience)
    keras_stopper.set_model(compiled())
    keras_stopper.on_train_begin()
    plugin, trainer = EarlyStopping(monitor="loss", patience=patience), make_trainer()
    plugin.on_train_begin()
    for epoch, loss in enumerate(losses):
        keras_stopper.on_epoch_end(epoch, {"loss": loss})
        plugin.on_epoch_end(trainer=trainer, epoch=epoch, logs={"loss": loss})
        assert trainer.stop_training == keras_stopper.model.stop_training
        if trainer.stop_training:
            break
    assert plugin.stopped_epoch == keras_stopper.stopped_epoch == max(patience, 1) + 2


def test_reuse_across_fits_resets_the_state():
    # lr=0: the loss never improves, so every fit stops after exactly `patience` epochs.
    kwargs = dict(monitor="loss", patience=2)
    keras_stopper, plugin = keras.callbacks.EarlyStopping(**kwargs), EarlyStopping(**kwargs)
    first = four(lambda: keras_stopper, lambda: plugin, epochs=10, model_fn=lambda: compiled(lr=0.0))
    second = four(lambda: keras_stopper, lambda: plugin, epochs=10, model_fn=lambda: compiled(lr=0.0))
    for runs in (first, second):
        assert runs["keras"].epochs == [0, 1, 2]
        for way in WAYS:
            assert runs[way].epochs == runs["keras"].epochs, way


def test_state_is_cleared_at_train_begin():
    plugin = EarlyStopping(monitor="loss", patience=3, restore_best_weights=True)
    plugin.best, plugin.wait, plugin.stopped_epoch, plugin.best_epoch, plugin.best_weights = 0.1, 3, 5, 5, [1]
    plugin.on_train_begin()
    assert (plugin.best, plugin.wait, plugin.stopped_epoch, plugin.best_epoch, plugin.best_weights) == (
        None,
        0,
        0,
        0,
        None,
    )


def test_unreached_baseline_stops_after_patience():
    # lr=0: the first epoch sets the best but not the baseline, so the wait is never restarted.
    kwargs = dict(monitor="loss", patience=3, baseline=1e-6)
    runs = four(
        lambda: keras.callbacks.EarlyStopping(**kwargs),
        lambda: EarlyStopping(**kwargs),
        epochs=20,
        model_fn=lambda: compiled(lr=0.0),
    )
    assert runs["keras"].epochs == [0, 1, 2]
    for way in WAYS:
        assert runs[way].epochs == runs["keras"].epochs, way


def test_restore_best_weights_gives_the_best_epochs_weights():
    # A too large learning rate: the validation loss gets worse after its best epoch.
    kwargs = dict(monitor="val_loss", patience=2, restore_best_weights=True)
    runs = four(
        lambda: keras.callbacks.EarlyStopping(**kwargs),
        lambda: EarlyStopping(**kwargs),
        epochs=12,
        validation_split=0.25,
        model_fn=lambda: compiled(lr=3.0),
    )
    assert runs["keras"].obj.stopped_epoch > 0
    for way in WAYS:
        assert runs[way].epochs == runs["keras"].epochs, way
        assert runs[way].obj.best_epoch == runs["keras"].obj.best_epoch, way
        same_weights(runs[way], runs["keras"])


@pytest.mark.parametrize("start_from_epoch, patience", [(2, 0)])
def test_start_from_epoch_delays_the_watch(start_from_epoch, patience):
    kwargs = dict(monitor="loss", patience=patience, start_from_epoch=start_from_epoch)
    runs = four(
        lambda: keras.callbacks.EarlyStopping(**kwargs),
        lambda: EarlyStopping(**kwargs),
        epochs=10,
        model_fn=lambda: compiled(lr=0.0),
    )
    assert len(runs["keras"].epochs) >= start_from_epoch + patience
    for way in WAYS:
        assert runs[way].epochs == runs["keras"].epochs, way
