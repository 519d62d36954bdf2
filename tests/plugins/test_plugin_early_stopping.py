"""EarlyStopping against keras.callbacks.EarlyStopping: same decisions, same restored weights."""

import contextlib
import json
import logging
import math
import warnings

import keras
import numpy as np
import pytest

import corebus
from corebus import ConfigError
from corebus.plugins.early_stopping import EarlyStopping
from corebus.testing import make_trainer, tiny_data, tiny_model

HIDDEN = 16


def noisy_data():
    """Labels with 30% noise: the validation loss bottoms out early and then wanders or rises."""
    x, y = tiny_data(n=64)
    rng = np.random.default_rng(1)
    y = y.copy()
    flip = rng.random(len(y)) < 0.3
    y[flip] = rng.integers(0, 3, flip.sum())
    return x, y


FIT = dict(batch_size=16, validation_split=0.25, shuffle=False, verbose=0)


def compiled(optimizer):
    model = tiny_model(hidden=HIDDEN)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def keras_run(kwargs, lr, epochs):
    x, y = noisy_data()
    callback = keras.callbacks.EarlyStopping(**kwargs)
    model = compiled(keras.optimizers.SGD(lr))
    history = model.fit(x, y, epochs=epochs, callbacks=[callback], **FIT)
    return callback, history, model.get_weights()


def engine_run(kwargs, lr, epochs):
    x, y = noisy_data()
    plugin = EarlyStopping(**kwargs)
    trainer = make_trainer([plugin], model=tiny_model(hidden=HIDDEN), optimizer=keras.optimizers.SGD(lr))
    history = trainer.fit(x, y, epochs=epochs, **FIT)
    return plugin, history, trainer.model.get_weights()


def adapter_run(kwargs, lr, epochs):
    x, y = noisy_data()
    plugin = EarlyStopping(**kwargs)
    callback = corebus.KerasCallback([plugin])
    model = compiled(callback.wrap_optimizer(keras.optimizers.SGD(lr)))
    history = model.fit(x, y, epochs=epochs, callbacks=[callback], **FIT)
    return plugin, history, model.get_weights()


# lr=3.0: a noisy val_loss (best at epoch 1); lr=0.3: smooth, minimum at epoch 3, then rising.
CONFIGS = {
    "patience3_restore": (3.0, 10, dict(patience=3, restore_best_weights=True)),
    "min_delta_no_restore": (3.0, 10, dict(patience=2, min_delta=0.05)),
    "max_val_accuracy": (3.0, 10, dict(monitor="val_accuracy", mode="max", patience=2, restore_best_weights=True)),
    "baseline_never_beaten": (3.0, 10, dict(patience=3, baseline=1.0, restore_best_weights=True)),
    "baseline_beaten": (0.3, 10, dict(patience=2, baseline=0.9, restore_best_weights=True)),
    "start_from_epoch": (3.0, 10, dict(patience=2, start_from_epoch=3, restore_best_weights=True)),
    "never_stops_restore": (0.3, 6, dict(patience=20, restore_best_weights=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_stop_and_weights_as_keras(name):
    lr, epochs, kwargs = CONFIGS[name]
    ref, ref_history, ref_weights = keras_run(kwargs, lr, epochs)
    never_stops = name.startswith("never_stops")
    # the config exercises what its name says (checked on Keras's run, not hard-coded)
    assert (ref.stopped_epoch == 0) == never_stops
    assert len(ref_history.epoch) == (epochs if never_stops else ref.stopped_epoch + 1)
    if never_stops and kwargs.get("restore_best_weights"):
        # Keras 3 restores the best weights at train end even without an early stop
        assert ref.best_epoch < epochs - 1

    for run, rtol in ((adapter_run, 0), (engine_run, 1e-5)):
        plugin, history, weights = run(kwargs, lr, epochs)
        assert plugin.stopped_epoch == ref.stopped_epoch
        assert history.epoch == ref_history.epoch
        assert plugin.best_epoch == ref.best_epoch
        assert plugin.wait == ref.wait
        assert plugin.best == pytest.approx(float(ref.best), rel=1e-5)
        for ours, theirs in zip(weights, ref_weights, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * 1e-1)


# --------------------------------------------------------------------- decision by decision


def float32s(values):
    # epoch logs hold Python floats of float32 values, in Keras and in corebus alike
    return [None if v is None else float(np.float32(v)) for v in values]


SEQUENCES = {
    "patience0": (dict(patience=0), float32s([1.0, 0.9, 0.95, 0.8])),
    "patience2": (dict(patience=2), float32s([1.0, 0.9, 0.95, 0.91, 0.85, 0.86, 0.87, 0.88])),
    "min_delta": (dict(patience=1, min_delta=0.05), float32s([1.0, 0.97, 0.9, 0.88, 0.86, 0.8, 0.79])),
    "baseline_restore": (
        dict(patience=2, baseline=0.8, restore_best_weights=True),
        float32s([1.0, 0.9, 0.79, 0.85, 0.78, 0.9, 0.95, 0.99]),
    ),
    "start_from_epoch": (dict(patience=1, start_from_epoch=2), float32s([1.0, 2.0, 3.0, 2.5, 2.6, 2.7])),
    "missing_metric_epochs": (dict(patience=1), float32s([1.0, None, 0.9, None, 0.95, 0.97])),
    "nan_first": (dict(patience=1), [math.nan, 1.0, 0.9]),
    "max_mode": (dict(monitor="val_accuracy", mode="max", patience=2), float32s([0.5, 0.6, 0.6, 0.7, 0.65, 0.6, 0.6])),
    "auto_accuracy": (
        dict(monitor="val_accuracy", patience=1, restore_best_weights=True),
        float32s([0.5, 0.6, 0.55, 0.5]),
    ),
    # float32(0.3) == 0.3 for Keras (it compares with keras.ops, in float32), but
    # 0.30000001192 > 0.3 in float64: the baseline never counts as beaten here.
    "float32_baseline": (dict(monitor="val_accuracy", mode="max", baseline=0.3, patience=2), float32s([0.3] * 6)),
    "float32_min_delta": (dict(patience=1, min_delta=0.1), float32s([0.7, 0.6, 0.5, 0.4, 0.3])),
    "never_stops": (dict(patience=10, restore_best_weights=True), float32s([1.0, 0.5, 0.7, 0.8])),
}


@pytest.fixture(scope="module")
def dummy_models():
    x, y = tiny_data(n=8)
    models = [compiled("sgd") for _ in range(2)]
    for model in models:
        model.evaluate(x, y, verbose=0)  # builds the compiled metrics, so mode="auto" finds accuracy
    return models, models[0].get_weights()


def keras_state(callback):
    return (callback.wait, callback.best, callback.best_epoch, callback.stopped_epoch)


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_same_decisions_as_keras_epoch_by_epoch(name, dummy_models):
    kwargs, sequence = SEQUENCES[name]
    monitor = kwargs.get("monitor", "val_loss")
    (ref_model, our_model), base = dummy_models
    for model in (ref_model, our_model):
        model.stop_training = False
    ref = keras.callbacks.EarlyStopping(**kwargs)
    ref.set_model(ref_model)
    plugin = EarlyStopping(**kwargs)
    adapter = corebus.KerasCallback([plugin])
    adapter.set_model(our_model)
    adapter.set_params({"epochs": len(sequence), "steps": 1, "verbose": 0})
    ref.on_train_begin()
    adapter.on_train_begin()
    stopped = None
    for epoch, value in enumerate(sequence):
        # distinct weights per epoch, so restoring the wrong epoch cannot go unnoticed
        for model in (ref_model, our_model):
            model.set_weights([w + epoch for w in base])
        logs = {"loss": 1.0, "accuracy": 0.5} if value is None else {monitor: value, "loss": 1.0}
        with pytest.warns(UserWarning) if value is None else contextlib.nullcontext():
            ref.on_epoch_end(epoch, dict(logs))
        adapter.on_epoch_end(epoch, dict(logs))
        ours = (plugin.wait, plugin.best, plugin.best_epoch, plugin.stopped_epoch)
        theirs = keras_state(ref)
        assert ours[0] == theirs[0] and ours[2:] == theirs[2:], f"epoch {epoch}"
        assert ours[1] == theirs[1] or (theirs[1] != theirs[1] and ours[1] != ours[1]), f"epoch {epoch}"
        assert our_model.stop_training == ref_model.stop_training, f"epoch {epoch}"
        if ref_model.stop_training:
            stopped = epoch
            break
    assert (stopped is None) == (name == "never_stops")
    ref.on_train_end()
    adapter.on_train_end()
    for ours, theirs in zip(our_model.get_weights(), ref_model.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_verbose_messages_match_keras(dummy_models, capsys):
    (ref_model, our_model), _ = dummy_models
    kwargs = dict(patience=1, verbose=1, restore_best_weights=True)
    ref, plugin = keras.callbacks.EarlyStopping(**kwargs), EarlyStopping(**kwargs)
    adapter = corebus.KerasCallback([plugin])
    ref.set_model(ref_model)
    adapter.set_model(our_model)
    adapter.set_params({"epochs": 3, "steps": 1, "verbose": 1})
    outputs = []
    for callback, model in ((ref, ref_model), (adapter, our_model)):
        model.stop_training = False
        callback.on_train_begin()
        for epoch, value in enumerate([1.0, 0.5, 0.7]):
            callback.on_epoch_end(epoch, {"val_loss": value})
        callback.on_train_end()
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert "Epoch 3: early stopping" in outputs[1] and "best epoch: 2." in outputs[1]


# --------------------------------------------------------------------- resume


def test_state_dict_is_json_and_round_trips_exactly():
    lr, epochs, kwargs = CONFIGS["patience3_restore"]
    plugin, _, _ = engine_run(kwargs, lr, 3)
    state = json.loads(json.dumps(plugin.state_dict()))
    fresh = EarlyStopping(**kwargs)
    fresh.load_state_dict(state)
    assert (fresh.wait, fresh.best, fresh.best_epoch, fresh.stopped_epoch) == (
        plugin.wait,
        plugin.best,
        plugin.best_epoch,
        plugin.stopped_epoch,
    )
    assert plugin.best_weights is not None
    for a, b in zip(fresh.best_weights, plugin.best_weights, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

    # the next fit after a load continues from the state; a later fit starts over, as in Keras
    fresh.on_train_begin()
    assert (fresh.wait, fresh.best) == (plugin.wait, plugin.best) and fresh.best_weights is not None
    fresh.on_train_begin()
    assert (fresh.wait, fresh.best, fresh.best_epoch, fresh.best_weights) == (0, None, 0, None)


@pytest.mark.parametrize("mode", ["adapter", "engine"])
def test_resumed_instance_stops_where_an_uninterrupted_one_does(mode):
    lr, epochs, kwargs = CONFIGS["patience3_restore"]
    x, y = noisy_data()

    def fit(model, plugin, **fit_kwargs):
        if mode == "engine":
            trainer = make_trainer([plugin], model=model, optimizer=keras.optimizers.SGD(lr))
            return trainer.fit(x, y, **FIT, **fit_kwargs)
        callback = corebus.KerasCallback([plugin])
        if not model.compiled:
            model.compile(
                optimizer=keras.optimizers.SGD(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
            )
        return model.fit(x, y, callbacks=[callback], **FIT, **fit_kwargs)

    whole = EarlyStopping(**kwargs)
    whole_model = tiny_model(hidden=HIDDEN)
    whole_history = fit(whole_model, whole, epochs=epochs)
    assert 3 < whole.stopped_epoch < epochs - 1  # the stop happens after the interruption

    first = EarlyStopping(**kwargs)
    model = tiny_model(hidden=HIDDEN)
    fit(model, first, epochs=3)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = EarlyStopping(**kwargs)
    resumed.load_state_dict(state)
    history = fit(model, resumed, epochs=epochs, initial_epoch=3)

    assert resumed.stopped_epoch == whole.stopped_epoch
    assert resumed.best_epoch == whole.best_epoch
    assert resumed.wait == whole.wait
    assert history.epoch == whole_history.epoch[3:]
    # the best epoch lies before the interruption: the restored weights come from the state
    assert whole.best_epoch < 3
    for a, b in zip(model.get_weights(), whole_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(patience=-1), "patience=-1"), (dict(mode="maximum"), "mode='maximum'"), (dict(monitor=""), "monitor")],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EarlyStopping(**kwargs)


def test_missing_monitor_is_an_error_at_the_first_epoch_end_where_keras_warns_for_ever():
    # Keras: a warning every epoch and an early stopping that never triggers.
    x, y = tiny_data(n=32)
    callback = keras.callbacks.EarlyStopping(patience=0)  # monitors val_loss, but no validation runs
    with pytest.warns(UserWarning, match="val_loss"):
        keras_history = compiled("sgd").fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[callback])
    assert keras_history.epoch == [0, 1, 2]
    # corebus: one clear error at the first epoch end, saying why the key is missing.
    trainer = make_trainer([EarlyStopping(patience=0)])
    with pytest.raises(
        ConfigError,
        match=r"monitor='val_loss' is not in the epoch logs \(this run has no "
        r"validation data: pass validation_data=.*did you mean monitor='loss'",
    ):
        trainer.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert trainer.epoch == 0


@pytest.mark.parametrize("way", ["engine", "adapter"])
def test_misspelt_monitor_names_the_close_match_not_the_mode(way):
    # The report: monitor="val_acc" said "cannot be inferred, pass mode=", and with mode="max"
    # training ran with an early stopping that never triggered.
    x, y = tiny_data(n=32)
    for kwargs in (dict(monitor="val_acc"), dict(monitor="val_acc", mode="max")):
        plugin = EarlyStopping(patience=0, **kwargs)
        with pytest.raises(ConfigError) as info:
            if way == "engine":
                make_trainer([plugin]).fit(x, y, batch_size=16, epochs=3, validation_split=0.25, verbose=0)
            else:
                compiled("sgd").fit(
                    x,
                    y,
                    batch_size=16,
                    epochs=3,
                    validation_split=0.25,
                    verbose=0,
                    callbacks=[corebus.KerasCallback([plugin])],
                )
        message = str(info.value)
        assert "did you mean monitor='val_accuracy'?" in message and "mode=" not in message
        assert "Available keys: accuracy, loss, val_accuracy, val_loss" in message
        assert plugin.wait == 0  # raised at the first epoch end


def test_val_monitor_waits_for_validation_freq_epochs(caplog):
    x, y = tiny_data(n=32)
    fit = dict(batch_size=16, epochs=4, validation_split=0.25, validation_freq=2, shuffle=False, verbose=0)
    keras_callback = keras.callbacks.EarlyStopping(patience=1)
    with warnings_ignored():
        keras_history = compiled("sgd").fit(x, y, callbacks=[keras_callback], **fit)
    engine = EarlyStopping(patience=1)
    with caplog.at_level(logging.WARNING, logger="corebus"):
        engine_history = make_trainer([engine], model=tiny_model(hidden=HIDDEN)).fit(x, y, **fit)
    assert not [r for r in caplog.records if r.name == "corebus"]  # the engine knows validation comes at epoch 2
    adapted = EarlyStopping(patience=1)
    with caplog.at_level(logging.WARNING, logger="corebus"):
        adapter_history = compiled("sgd").fit(x, y, callbacks=[corebus.KerasCallback([adapted])], **fit)
    # model.fit does not say whether validation will run: one warning, as Keras warns
    assert len([r for r in caplog.records if "no validation ran" in r.getMessage()]) == 1
    assert engine_history.epoch == adapter_history.epoch == keras_history.epoch
    assert engine.best == pytest.approx(keras_callback.best, rel=1e-5)
    assert adapted.best == pytest.approx(keras_callback.best, rel=1e-5)

    strict = EarlyStopping(patience=1, strict=True)
    with pytest.raises(ConfigError, match="monitor='val_loss' is not in the epoch logs"):
        make_trainer([strict]).fit(x, y, **fit)


@contextlib.contextmanager
def warnings_ignored():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras's "val_loss not available" at epochs without validation
        yield


def vector_model():
    model = tiny_model(hidden=HIDDEN)
    model.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=[keras.metrics.F1Score(average=None)])
    return model


VECTOR_FIT = dict(batch_size=16, epochs=4, validation_split=0.25, shuffle=False, verbose=0)


def test_vector_monitor_fails_in_keras_and_is_a_clear_error_here_through_the_adapter():
    x, y = noisy_data()
    y = keras.utils.to_categorical(y, 3)
    keras_callback = keras.callbacks.EarlyStopping(monitor="val_f1_score", mode="max", patience=2)
    seen = []
    recorder = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(epoch))
    with pytest.raises(ValueError, match="truth value of an array"):  # Keras's own, at the second epoch
        vector_model().fit(x, y, callbacks=[recorder, keras_callback], **VECTOR_FIT)
    assert seen == [0, 1]

    plugin = EarlyStopping(monitor="val_f1_score", mode="max", patience=2)
    seen.clear()
    with pytest.raises(ConfigError, match=r"monitor='val_f1_score' is a vector of shape \(3,\).*average='macro'"):
        vector_model().fit(x, y, callbacks=[recorder, corebus.KerasCallback([plugin])], **VECTOR_FIT)
    assert seen == [0]  # at the first epoch end, not a crash at the second


def test_vector_monitor_is_a_clear_error_in_the_engine():
    x, y = noisy_data()
    trainer = make_trainer(
        [EarlyStopping(monitor="val_f1_score", mode="max", patience=2)],
        model=tiny_model(hidden=HIDDEN),
        loss="categorical_crossentropy",
        metrics=[keras.metrics.F1Score(average=None)],
    )
    with pytest.raises(ConfigError, match="is a vector of shape"):
        trainer.fit(x, keras.utils.to_categorical(y, 3), **VECTOR_FIT)


def test_one_element_vector_is_its_value_as_in_keras():
    monitor = corebus.Monitor("val_auc", "max", owner="EarlyStopping")
    assert monitor.current({"val_auc": np.array([0.75], "float32")}) == 0.75
    assert monitor.current({"val_auc": np.float32(0.5)}) == 0.5


def test_verbose_messages_go_where_keras_sends_them(capsys, caplog):
    caplog.set_level(logging.INFO)  # Keras logs them at INFO once interactive logging is off
    kwargs = dict(patience=0, verbose=1, restore_best_weights=True)
    try:
        for interactive in (True, False):
            (keras.config.enable_interactive_logging if interactive else keras.config.disable_interactive_logging)()
            caplog.clear()
            keras_run(kwargs, 0.5, 8)
            theirs = capsys.readouterr().out, [r.getMessage() for r in caplog.records]
            engine_run(kwargs, 0.5, 8)
            ours = capsys.readouterr().out, [r.getMessage() for r in caplog.records][len(theirs[1]) :]
            assert "early stopping" in (theirs[0] if interactive else " ".join(theirs[1]))
            assert ours == (theirs[0], theirs[1])
    finally:
        keras.config.enable_interactive_logging()
