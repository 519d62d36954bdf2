"""ReduceLROnPlateau against keras.callbacks.ReduceLROnPlateau: same LR after every epoch."""

import json
import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError, hookimpl
from corebus.plugins.lr_schedule import LRSchedule
from corebus.plugins.reduce_lr_on_plateau import ReduceLROnPlateau
from corebus.testing import fit_both_ways, make_trainer, tiny_model

LOSS = "sparse_categorical_crossentropy"


def _random_walk(seed, n=30):
    rng = np.random.default_rng(seed)
    return list(1.0 + np.cumsum(rng.normal(-0.002, 0.004, size=n)))


# (values of the monitored metric per epoch, None = missing from the logs), kwargs, initial LR
SEQUENCES = {
    "plateaus": ([1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85], dict(factor=0.5, patience=2), 0.1),
    # differences of exactly min_delta, and ones that differ from it only below float32 precision
    "min_delta_edges": (
        [1.0, 0.9, 0.8, 0.7, 0.6000001, 0.5, 0.4, 0.30000001, 0.2, 0.1],
        dict(min_delta=0.1, patience=1),
        0.1,
    ),
    "default_min_delta_edges": (
        [1.0, 0.9999, 0.99989999, 0.99979, 0.9997, 0.99960001, 0.99950002, 0.9994, 0.99929999, 0.9992],
        dict(patience=1, factor=0.5),
        0.01,
    ),
    "cooldown": ([1.0] * 12, dict(patience=1, cooldown=2, factor=0.5), 0.1),
    "cooldown_with_improvements": (
        [1.0, 1.0, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4],
        dict(patience=1, cooldown=3, factor=0.5),
        0.1,
    ),
    # the floor: clamped to min_lr, then no more reductions (and wait keeps growing, as in Keras)
    "min_lr_floor": ([1.0] * 10, dict(patience=1, factor=0.5, min_lr=0.003), 0.01),
    "min_lr_reached_exactly": ([1.0] * 8, dict(patience=1, factor=0.5, min_lr=0.025), 0.1),
    "min_lr_above_lr": ([1.0] * 6, dict(patience=1, min_lr=0.05), 0.01),
    "patience_zero": ([1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.7], dict(patience=0, factor=0.5), 0.1),
    "factor_zero": ([1.0, 1.0, 1.0, 1.0], dict(patience=1, factor=0.0), 0.1),
    "missing_epochs": ([1.0, None, 1.0, None, 1.0, 1.0], dict(patience=1, factor=0.5), 0.1),
    "walk_a": (_random_walk(0), dict(patience=2, cooldown=1, factor=0.5, min_delta=1e-3, min_lr=1e-4), 0.1),
    "walk_b": (_random_walk(1), dict(patience=1, factor=0.2, min_delta=0.0), 0.05),
    "walk_c": (_random_walk(2), dict(patience=3, cooldown=2, factor=0.7, min_delta=0.004, min_lr=0.02), 0.1),
}


def keras_trajectory(values, kwargs, lr0, monitor="val_loss"):
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(lr0), loss=LOSS)
    callback = keras.callbacks.ReduceLROnPlateau(monitor=monitor, **kwargs)
    callback.set_model(model)
    callback.on_train_begin()
    rows = []
    for epoch, value in enumerate(values):
        logs = {"loss": 0.5} if value is None else {"loss": 0.5, monitor: value}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns for every epoch missing the metric
            callback.on_epoch_end(epoch, logs)
        rows.append(
            (
                logs["learning_rate"],
                float(model.optimizer.learning_rate),
                callback.wait,
                callback.cooldown_counter,
                callback.best,
            )
        )
    return rows


def corebus_trajectory(values, kwargs, lr0, monitor="val_loss"):
    trainer = make_trainer(optimizer=keras.optimizers.SGD(lr0))
    plugin = ReduceLROnPlateau(monitor=monitor, **kwargs)
    plugin.on_train_begin(trainer=trainer)
    rows = []
    for epoch, value in enumerate(values):
        logs = {"loss": 0.5} if value is None else {"loss": 0.5, monitor: value}
        plugin.on_epoch_end(trainer=trainer, epoch=epoch, logs=logs)
        rows.append((logs["learning_rate"], trainer.lr.value, plugin.wait, plugin.cooldown_counter, plugin.best))
    return rows


def assert_same_rows(ours, theirs):
    assert len(ours) == len(theirs)
    np.testing.assert_allclose([r[:2] for r in ours], [r[:2] for r in theirs], rtol=1e-7, atol=0)
    assert [r[2:] for r in ours] == [r[2:] for r in theirs]  # wait, cooldown_counter, best


@pytest.mark.parametrize("case", sorted(SEQUENCES))
def test_metric_sequence_gives_the_keras_lr_after_every_epoch(case):
    values, kwargs, lr0 = SEQUENCES[case]
    theirs = keras_trajectory(values, kwargs, lr0)
    ours = corebus_trajectory(values, kwargs, lr0)
    assert_same_rows(ours, theirs)
    if case in ("plateaus", "cooldown", "min_lr_floor", "walk_a"):
        assert theirs[-1][1] < lr0  # the case really reduces


def test_max_mode_on_an_accuracy_like_metric():
    values = [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.72, 0.74, 0.75, 0.75]
    kwargs = dict(mode="max", min_delta=0.05, patience=2, factor=0.5, cooldown=1)
    theirs = keras_trajectory(values, kwargs, 0.1, monitor="val_accuracy")
    assert_same_rows(corebus_trajectory(values, kwargs, 0.1, monitor="val_accuracy"), theirs)
    assert theirs[-1][1] < 0.1


def test_verbose_message_is_the_keras_one(capsys):
    values, kwargs, lr0 = SEQUENCES["plateaus"]
    keras_trajectory(values, dict(kwargs, verbose=1), lr0)
    theirs = capsys.readouterr().out
    corebus_trajectory(values, dict(kwargs, verbose=1), lr0)
    ours = capsys.readouterr().out
    assert "ReduceLROnPlateau reducing learning rate to" in theirs
    assert ours == theirs


FIT = dict(batch_size=16, epochs=6, validation_split=0.25)
PLATEAU = dict(monitor="val_loss", factor=0.5, patience=1, min_delta=0.02, cooldown=1, min_lr=0.002)


def test_end_to_end_lr_trajectory_matches_keras(tiny_data):
    x, y = tiny_data
    (_, engine), (_, adapter) = fit_both_ways(lambda: [ReduceLROnPlateau(**PLATEAU)], x, y, **FIT)
    model = tiny_model()
    model.compile(optimizer="sgd", loss=LOSS, metrics=["accuracy"])
    reference = model.fit(
        x, y, shuffle=False, verbose=0, callbacks=[keras.callbacks.ReduceLROnPlateau(**PLATEAU)], **FIT
    )
    expected = reference.history["learning_rate"]
    assert len(set(expected)) >= 3  # reduced twice, then held at min_lr
    assert expected[-1] == pytest.approx(PLATEAU["min_lr"])
    np.testing.assert_allclose(engine.history["learning_rate"], expected, rtol=1e-7, atol=0)
    np.testing.assert_allclose(adapter.history["learning_rate"], expected, rtol=1e-7, atol=0)
    np.testing.assert_allclose(engine.history["val_loss"], reference.history["val_loss"], rtol=1e-5)


class LRPerStep:
    """Records (step, effective LR, multiplier) before every step: the LR that step uses."""

    def __init__(self):
        self.rows = []

    @hookimpl
    def on_train_batch_begin(self, trainer):
        self.rows.append((trainer.global_step, trainer.lr.value, trainer.lr.multiplier))


class ScheduleTimesRecordedMultiplier(keras.optimizers.schedules.LearningRateSchedule):
    """Plain-Keras replay of ``schedule(step) * multiplier[step]`` (multipliers recorded by corebus)."""

    def __init__(self, schedule, multipliers):
        self.schedule = schedule
        self.multipliers = tf.constant(multipliers, tf.float32)

    def __call__(self, step):
        return tf.cast(self.schedule(step), tf.float32) * tf.gather(self.multipliers, step)


def test_plateau_scales_a_schedule_where_keras_crashes(tiny_data):
    x, y = tiny_data
    decay = dict(initial_learning_rate=0.1, decay_steps=3, decay_rate=0.8)
    plateau = dict(monitor="loss", factor=0.5, patience=1, min_delta=0.5)  # only epoch 0 improves
    # keras: ReduceLROnPlateau next to an optimizer built with a schedule (tensorflow#36612)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(**decay)), loss=LOSS)
    with pytest.raises((TypeError, AttributeError), match="not settable"):
        model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[keras.callbacks.ReduceLROnPlateau(**plateau)])

    schedule = keras.optimizers.schedules.ExponentialDecay(**decay)
    (engine, engine_history), (adapter, _) = fit_both_ways(
        lambda: [LRSchedule("exponential", **decay), ReduceLROnPlateau(**plateau), LRPerStep()],
        x,
        y,
        batch_size=16,
        epochs=4,
    )
    rows = engine[2].rows
    assert [r[0] for r in rows] == list(range(24))
    assert min(m for _, _, m in rows) <= 0.25  # the plateau reduced at least twice
    np.testing.assert_allclose([v for _, v, _ in rows], [float(schedule(s)) * m for s, _, m in rows], rtol=1e-6)
    np.testing.assert_allclose([r[1:] for r in adapter[2].rows], [r[1:] for r in rows], rtol=1e-7)
    # the optimizer's own schedule is scaled the same way (no LRSchedule plugin needed)
    recorder = LRPerStep()
    make_trainer(
        [ReduceLROnPlateau(**plateau), recorder],
        optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(**decay)),
    ).fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
    np.testing.assert_allclose(recorder.rows, rows, rtol=1e-7)
    # and the compiled step really used those rates: replaying them in plain Keras gives the
    # same weights
    model = tiny_model()
    replay = ScheduleTimesRecordedMultiplier(schedule, [m for _, _, m in rows])
    model.compile(optimizer=keras.optimizers.SGD(replay), loss=LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
    for ours, theirs in zip(engine_history.model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_min_lr_clamps_the_scaled_schedule_at_the_reduction(tiny_data):
    x, y = tiny_data
    # every epoch after the first is a plateau: x0.1, then clamped so schedule(step) * m == min_lr
    recorder = LRPerStep()
    seen = []

    class AtEpochEnd:
        @hookimpl(trylast=True)
        def on_epoch_end(self, trainer):
            seen.append((trainer.global_step, trainer.lr.value))

    plugins = [
        LRSchedule("exponential", initial_learning_rate=0.1, decay_steps=6, decay_rate=0.9),
        ReduceLROnPlateau(monitor="loss", patience=0, min_delta=10.0, min_lr=0.004),
        recorder,
        AtEpochEnd(),
    ]
    make_trainer(plugins).fit(x, y, batch_size=16, epochs=4, verbose=0)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 6, 0.9)
    assert seen[0][1] == pytest.approx(float(schedule(6)), rel=1e-6)  # epoch 0 sets the best
    step, lr = seen[1]  # first reduction: by factor, 0.1 x schedule(12) = 0.0081 > min_lr
    assert lr == pytest.approx(float(schedule(step)) * 0.1, rel=1e-6)
    step, lr = seen[2]  # second: 0.1 x would go below min_lr, so it lands on min_lr
    assert lr == pytest.approx(0.004, rel=1e-6)
    assert seen[3][1] < 0.004  # the schedule keeps decaying below it (documented)


def test_bad_input_fails_before_training():
    with pytest.raises(ConfigError, match="factor"):
        ReduceLROnPlateau(factor=1.0)
    with pytest.raises(ConfigError, match="factor"):
        ReduceLROnPlateau(factor=-0.5)
    with pytest.raises(ConfigError, match="patience"):
        ReduceLROnPlateau(patience=-1)
    with pytest.raises(ConfigError, match="cooldown"):
        ReduceLROnPlateau(cooldown=-2)
    with pytest.raises(ConfigError, match="mode='best'"):
        ReduceLROnPlateau(mode="best")
    with pytest.raises(ConfigError, match="rejected its params.*factor"):
        make_trainer([{"name": "reduce_lr_on_plateau", "factor": 2.0}])
    with pytest.raises(ValueError):  # Keras refuses the same factor
        keras.callbacks.ReduceLROnPlateau(factor=1.0)


def test_missing_metric_is_an_error_at_the_first_epoch_end(tiny_data):
    # Keras warns every epoch and never reduces; the issue asks for an error naming the keys.
    x, y = tiny_data
    plugin = ReduceLROnPlateau(monitor="val_loss", patience=0)
    with pytest.raises(
        ConfigError,
        match=r"monitor='val_loss' is not in the epoch logs \(this run has no validation "
        r"data.*Available keys: accuracy, learning_rate, loss",
    ):
        make_trainer([plugin]).fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert plugin.wait == 0


@pytest.mark.parametrize("way", ["engine", "adapter"])
def test_misspelt_monitor_names_the_close_match(tiny_data, way):
    x, y = tiny_data
    plugin = ReduceLROnPlateau(monitor="val_acc", patience=0)  # the metric is val_accuracy
    fit = dict(batch_size=32, epochs=3, validation_split=0.25, verbose=0)
    with pytest.raises(ConfigError) as info:
        if way == "engine":
            make_trainer([plugin]).fit(x, y, **fit)
        else:
            model = tiny_model()
            model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            model.fit(x, y, callbacks=[corebus.KerasCallback([plugin])], **fit)
    assert "did you mean monitor='val_accuracy'?" in str(info.value) and "mode=" not in str(info.value)


def test_verbose_message_goes_to_logging_when_keras_interactive_logging_is_off(capsys, caplog):
    values, kwargs, lr0 = SEQUENCES["plateaus"]
    keras.config.disable_interactive_logging()
    try:
        with caplog.at_level(logging.INFO):
            keras_trajectory(values, dict(kwargs, verbose=1), lr0)
            theirs = [r.getMessage() for r in caplog.records if "ReduceLROnPlateau" in r.getMessage()]
            caplog.clear()
            corebus_trajectory(values, dict(kwargs, verbose=1), lr0)
            ours = [r.getMessage() for r in caplog.records if "ReduceLROnPlateau" in r.getMessage()]
    finally:
        keras.config.enable_interactive_logging()
    assert theirs and ours == theirs
    assert capsys.readouterr().out == ""


def test_state_dict_round_trip_resumes_exactly(tiny_data):
    x, y = tiny_data
    kwargs = dict(monitor="val_loss", factor=0.5, patience=3, min_delta=0.5)  # nothing improves after epoch 0
    fit = dict(batch_size=16, validation_split=0.25, shuffle=False, verbose=0)

    def model_fit(model, plugin, **kw):
        return model.fit(x, y, callbacks=[corebus.KerasCallback([plugin])], **fit, **kw).history["learning_rate"]

    def compiled():
        model = tiny_model()
        model.compile(optimizer="sgd", loss=LOSS)
        return model

    whole = model_fit(compiled(), ReduceLROnPlateau(**kwargs), epochs=5)
    model, first = compiled(), ReduceLROnPlateau(**kwargs)
    head = model_fit(model, first, epochs=2)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["wait"] == 1 and state["cooldown_counter"] == 0 and state["best"] is not None
    resumed = ReduceLROnPlateau(**kwargs)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    tail = model_fit(model, resumed, initial_epoch=2, epochs=5)
    np.testing.assert_allclose(head + tail, whole, rtol=1e-7)
    assert whole[-1] < whole[0]
    # without the state, the counters restart and the reductions come later
    model = compiled()
    model_fit(model, ReduceLROnPlateau(**kwargs), epochs=2)
    fresh_tail = model_fit(model, ReduceLROnPlateau(**kwargs), initial_epoch=2, epochs=5)
    assert not np.allclose(head + fresh_tail, whole)
