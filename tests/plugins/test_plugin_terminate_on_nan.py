"""TerminateOnNaN against keras.callbacks.TerminateOnNaN: same stopping step, clear errors, cadence."""

import functools
import json

import keras
import numpy as np
import pytest

import corebus
from corebus import ConfigError, PluginError, hookimpl
from corebus.plugins.terminate_on_nan import TerminateOnNaN
from corebus.testing import make_trainer, tiny_data, tiny_model

FIT = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)  # 96 samples: 12 steps per epoch
STEPS_PER_EPOCH = 12


def data(inject_at=None):
    x, y = tiny_data()
    if inject_at is not None:
        x = x.copy()
        x[inject_at, 0] = np.inf
    return x, y


# lr=1e3 diverges until the loss overflows to NaN; an Inf sample makes its batch's loss NaN.
CASES = {
    "diverging": dict(lr=1e3, inject_at=None, steps_per_execution=1),
    "inf_in_data": dict(lr=0.01, inject_at=50, steps_per_execution=1),
    "steps_per_execution": dict(lr=1e3, inject_at=None, steps_per_execution=4),
}


def keras_model(lr, steps_per_execution=1, wrap=None):
    model = tiny_model()
    optimizer = keras.optimizers.SGD(lr)
    model.compile(
        optimizer=wrap(optimizer) if wrap else optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


@functools.cache
def keras_reference(name, raise_error=False):
    case = CASES[name]
    x, y = data(case["inject_at"])
    model = keras_model(case["lr"], case["steps_per_execution"])
    error = None
    try:
        history = model.fit(x, y, callbacks=[keras.callbacks.TerminateOnNaN(raise_error=raise_error)], **FIT)
    except RuntimeError as exc:
        history, error = None, exc
    return int(model.optimizer.iterations), history, error


def engine_fit(case, plugin, *others):
    x, y = data(case["inject_at"])
    trainer = make_trainer(
        [plugin, *others], optimizer=keras.optimizers.SGD(case["lr"]), steps_per_execution=case["steps_per_execution"]
    )
    return trainer, (lambda: trainer.fit(x, y, **FIT))


def adapter_fit(case, plugin, *others):
    x, y = data(case["inject_at"])
    callback = corebus.KerasCallback([plugin, *others])
    model = keras_model(case["lr"], case["steps_per_execution"], wrap=callback.wrap_optimizer)
    return callback.context, (lambda: model.fit(x, y, callbacks=[callback], **FIT))


@pytest.mark.parametrize("case", list(CASES))
def test_stops_at_the_same_step_as_keras(case, capsys):
    ref_steps, ref_history, _ = keras_reference(case)
    assert ref_steps < FIT["epochs"] * STEPS_PER_EPOCH  # Keras did stop early on this case
    assert np.isnan(ref_history.history["loss"][-1])
    capsys.readouterr()
    for fit in (engine_fit, adapter_fit):
        plugin = TerminateOnNaN()
        trainer, run = fit(CASES[case], plugin)
        history = run()
        assert plugin.stopped_step == trainer.global_step == ref_steps
        assert history.epoch == ref_history.epoch
        assert np.isnan(history.history["loss"][-1])
        assert f"Step {ref_steps} (epoch {ref_history.epoch[-1]}, batch " in capsys.readouterr().out


@pytest.mark.parametrize("kwargs", [dict(action="raise"), dict(raise_error=True)])
def test_raise_names_the_step_where_keras_raises(kwargs):
    case = CASES["diverging"]
    ref_steps, _, ref_error = keras_reference("diverging", raise_error=True)
    assert isinstance(ref_error, RuntimeError)
    ended = []

    class SeesEnd:
        @hookimpl
        def on_train_end(self):
            ended.append(True)

    for fit in (engine_fit, adapter_fit):
        trainer, run = fit(case, TerminateOnNaN(**kwargs), SeesEnd())
        with pytest.raises(PluginError) as info:
            run()
        assert isinstance(info.value.error, RuntimeError)
        assert f"at global step {ref_steps} " in str(info.value) and "Loss value: nan" in str(info.value)
        assert trainer.global_step == ref_steps
    assert not ended


def test_nan_raises_an_alert_for_notifiers():
    alerts = []

    class Notifier:
        @hookimpl
        def on_alert(self, alert):
            alerts.append(alert)

    _, run = engine_fit(CASES["inf_in_data"], TerminateOnNaN(), Notifier())
    run()
    assert [(a.kind, a.level, a.step) for a in alerts] == [("nan_loss", "error", 7)]  # sample 50 -> step 7


class FetchSpy:
    """Records the steps whose batch logs were fetched (by the plugins that ran before it)."""

    def __init__(self):
        self.steps = []

    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer, logs):
        if logs.fetched:
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize(
    "check_every, fetched, stopped_step",
    [
        (1, list(range(1, 8)), 7),  # every step, like Keras: one fetch per step
        (4, [4, 8], 8),  # NaN at step 7 is caught at the next due step (the loss is a running mean)
        (100, [], STEPS_PER_EPOCH),  # never due inside the epoch: caught by the epoch-end check
    ],
)
def test_check_every_reads_the_loss_only_when_due(check_every, fetched, stopped_step):
    plugin, spy = TerminateOnNaN(check_every=check_every), FetchSpy()
    trainer, run = engine_fit(CASES["inf_in_data"], plugin, spy)
    history = run()
    assert spy.steps == fetched
    assert plugin.stopped_step == stopped_step == trainer.global_step
    assert history.epoch == [0]


def test_resumed_instance_checks_the_same_steps():
    x, y = data()
    checks = []

    def fit(plugin, **fit_kwargs):
        spy = FetchSpy()
        callback = corebus.KerasCallback([plugin, spy])
        model.fit(x, y, callbacks=[callback], **{**FIT, **fit_kwargs})
        checks.append(spy.steps)

    model = keras_model(0.01)
    fit(TerminateOnNaN(check_every=5))
    whole = checks.pop()
    assert whole == [5, 10, 15, 20]

    model = keras_model(0.01)
    first = TerminateOnNaN(check_every=5)
    fit(first, epochs=1)
    resumed = TerminateOnNaN(check_every=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    fit(resumed, initial_epoch=1)
    assert checks[0] + checks[1] == whole
    assert resumed.state_dict() == {"stopped_step": None}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(action="explode"), "action='explode'"),
        (dict(check_every=0), "check_every=0"),
        (dict(action="raise", raise_error=False), "contradicts"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TerminateOnNaN(**kwargs)
