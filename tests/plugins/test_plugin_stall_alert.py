"""StallAlert: each detector triggered by a controlled run, in Trainer.fit and in model.fit;
stall alerts delivered to a real HTTP receiver on 127.0.0.1."""

import json
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError, hookimpl
from corebus.plugins.alert_webhook import AlertWebhook
from corebus.plugins.stall_alert import StallAlert
from corebus.plugins.terminate_on_nan import TerminateOnNaN
from corebus.testing import make_trainer, tiny_data, tiny_model

from webhook_receiver import Receiver

FIT = dict(batch_size=8, shuffle=False, verbose=0)  # tiny_data: 96 samples, 12 steps per epoch
TIMEOUT = 0.5
# A stall detector only: the other detectors are tested one by one below.
WATCHDOG = dict(
    timeout=TIMEOUT, first_step_timeout=30.0, grace=10.0, check_every=None, throughput_drop=None, divergence_factor=None
)


class Alerts:
    """Collects alerts as a notifier would."""

    def __init__(self):
        self.alerts = []

    @hookimpl
    def on_alert(self, alert):
        self.alerts.append(alert)

    def kinds(self):
        return [a.kind for a in self.alerts]


class SleepAt:
    """Sleeps ``seconds`` in ``hook`` at global step ``step``: the training thread is stuck."""

    def __init__(self, step, seconds, hook="on_train_batch_end"):
        self.step, self.seconds, self.hook, self.started = step, seconds, hook, None

    @hookimpl
    def on_train_batch_end(self, trainer):
        if self.hook == "on_train_batch_end":
            self._maybe_sleep(trainer.global_step)

    @hookimpl
    def on_train_batch_begin(self, trainer):
        if self.hook == "on_train_batch_begin":
            self._maybe_sleep(trainer.global_step)

    def _maybe_sleep(self, step):
        if step == self.step and self.started is None:
            self.started = time.time()
            time.sleep(self.seconds)


def watchdog_threads():
    return [t for t in threading.enumerate() if t.name == "corebus-stall-watchdog"]


def test_a_stall_reaches_a_webhook_once_with_the_stack_then_resolves():
    x, y = tiny_data()
    with Receiver() as receiver:
        sleeper = SleepAt(step=5, seconds=TIMEOUT + 1.5)
        plugins = [StallAlert(**WATCHDOG), AlertWebhook(url=receiver.url, format="slack"), sleeper]
        trainer = make_trainer(plugins)
        trainer.fit(x, y, epochs=2, **FIT)
        assert trainer.global_step == 24 and not watchdog_threads()
        stall, resolved = receiver.bodies()
        assert len(receiver.requests) == 2
    assert "Training stalled" in stall["text"] and "last completed step 5, epoch 0" in stall["text"]
    assert "time.sleep(self.seconds)" in stall["text"] and "_maybe_sleep" in stall["text"]  # the stuck line
    assert "Training resumed" in resolved["text"]
    resumed_at = int(resolved["text"].split("Progress again at step ")[1].split(",")[0])
    assert 6 <= resumed_at <= 24  # noticed within 0.1 s of the first step after the stall
    latency = receiver.requests[0]["time"] - sleeper.started
    assert latency <= TIMEOUT + 1.0, latency


def step_that_sleeps_at(call, seconds):
    """A model whose forward pass blocks inside the compiled step on its ``call``-th run."""
    calls = []

    def maybe_sleep():
        calls.append(1)
        if len(calls) == call:
            time.sleep(seconds)
        return np.float32(0)

    class Sleepy(keras.layers.Layer):
        def call(self, x):
            return x + tf.ensure_shape(tf.py_function(maybe_sleep, [], tf.float32), [])

        def compute_output_shape(self, input_shape):
            return input_shape

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), Sleepy(), keras.layers.Dense(3, activation="softmax")])


def test_a_stall_inside_the_compiled_step_is_caught_with_the_engine_stack():
    x, y = tiny_data()
    alerts = Alerts()
    trainer = make_trainer([StallAlert(**WATCHDOG), alerts], model=step_that_sleeps_at(4, TIMEOUT + 1.0))
    trainer.fit(x, y, epochs=1, **FIT)
    assert alerts.kinds() == ["stall", "stall_resolved"]
    stall = alerts.alerts[0]
    assert stall.level == "error" and stall.step == 3
    assert "in run_epoch" in stall.text and "in fit" in stall.text
    assert "Thread MainThread" in stall.details and "in maybe_sleep" in stall.details  # the py_function thread


def test_a_stall_in_model_fit_via_the_adapter():
    x, y = tiny_data()
    alerts = Alerts()
    callback = corebus.KerasCallback(
        [StallAlert(**WATCHDOG), alerts, SleepAt(7, TIMEOUT + 1.0, "on_train_batch_begin")]
    )
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, callbacks=[callback], **FIT)
    assert alerts.kinds() == ["stall", "stall_resolved"]
    assert alerts.alerts[0].step == 7 and "on_train_batch_begin" in alerts.alerts[0].text
    assert not watchdog_threads()


class SlowEpochEnd:
    """Validation batches and epoch-end work (a checkpoint) that each take longer than timeout."""

    def __init__(self, seconds):
        self.seconds = seconds

    @hookimpl
    def on_test_batch_end(self, batch):
        if batch == 0:
            time.sleep(self.seconds)

    @hookimpl
    def on_epoch_end(self):
        time.sleep(self.seconds)


def test_compilation_validation_and_epoch_end_get_their_grace():
    x, y = tiny_data()
    alerts = Alerts()
    # timeout 0.3 s: compiling the first train and test steps takes longer, and so does each
    # validation batch 0 and each epoch end here.
    plugin = StallAlert(timeout=0.3, first_step_timeout=30, grace=5, check_every=None, throughput_drop=None)
    make_trainer([plugin, alerts, SlowEpochEnd(0.6)]).fit(x, y, epochs=2, validation_split=0.25, **FIT)
    assert alerts.alerts == []
    tight = StallAlert(timeout=0.3, first_step_timeout=30, grace=0.05, check_every=None, throughput_drop=None)
    make_trainer([tight, alerts, SlowEpochEnd(0.6)]).fit(x, y, epochs=1, validation_split=0.25, **FIT)
    # Validation's first batch (compiling the test step) has no grace now; a training step slowed
    # by a busy machine may be reported too, so look for the validation one among them.
    assert any(a.kind == "stall" and "in validation" in a.text for a in alerts.alerts), alerts.alerts


def test_a_crashed_model_fit_leaves_no_watchdog_behind():
    class Crash:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    x, y = tiny_data()
    alerts = Alerts()
    callback = corebus.KerasCallback([StallAlert(**WATCHDOG), alerts, Crash()])
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(corebus.PluginError):
        model.fit(x, y, epochs=1, callbacks=[callback], **FIT)
    time.sleep(TIMEOUT * 3)  # model.fit has no exception hook: the watchdog sees fit is gone
    assert alerts.alerts == [] and not watchdog_threads()


# ---------------------------------------------------------------------- the other detectors


def nan_data():
    x, y = tiny_data()
    x = x.copy()
    x[50, 0] = np.inf  # sample 50: the loss turns NaN at step 7
    return x, y


@pytest.mark.parametrize("check_every, step", [(1, 7), (4, 8), (100, 12)])
def test_nan_loss_alert_names_the_step(check_every, step):
    alerts = Alerts()
    plugin = StallAlert(timeout=None, check_every=check_every, throughput_drop=None, divergence_factor=None)
    make_trainer([plugin, alerts], optimizer=keras.optimizers.SGD(0.01)).fit(*nan_data(), epochs=2, **FIT)
    (nan,) = alerts.alerts
    assert (nan.kind, nan.level, nan.step) == ("nan_loss", "error", step)
    assert f"at step {step}" in nan.text and "nan" in nan.text


def test_the_same_nan_seen_by_two_plugins_is_one_alert():
    alerts = Alerts()
    plugins = [TerminateOnNaN(), StallAlert(timeout=None, check_every=1, throughput_drop=None), alerts]
    make_trainer(plugins, optimizer=keras.optimizers.SGD(0.01)).fit(*nan_data(), epochs=2, **FIT)
    assert [(a.kind, a.step) for a in alerts.alerts] == [("nan_loss", 7)]


def regression(lr=0.0):
    """Dense(1) without bias on y = 0, mse: the loss is mean((x @ w)^2), fixed while lr = 0."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    x, _ = tiny_data()
    return model, x, np.zeros((len(x), 1), "float32")


class ScaleWeights:
    """Multiplies the weights by ``factor`` at every epoch end: the loss grows factor**2 per epoch."""

    def __init__(self, factor):
        self.factor = factor

    @hookimpl
    def on_epoch_end(self, trainer):
        for v in trainer.model.trainable_variables:
            v.assign(v * self.factor)


def fit_regression(plugins, epochs):
    model, x, y = regression()
    trainer = corebus.Trainer(model, optimizer=keras.optimizers.SGD(0.0), loss="mse", plugins=plugins, seed=0)
    return trainer.fit(x, y, epochs=epochs, **FIT)


def test_plateau_alert_after_patience_epochs_once():
    alerts = Alerts()
    plugin = StallAlert(timeout=None, patience=2, monitor="loss", check_every=None, throughput_drop=None)
    fit_regression([plugin, alerts], epochs=5)  # lr = 0: the loss never improves after epoch 0
    (plateau,) = alerts.alerts
    assert (plateau.kind, plateau.level, plateau.epoch) == ("plateau", "warning", 2)
    assert plateau.title == "loss has not improved for 2 epochs"
    assert (plugin.wait, plugin.best) == (4, pytest.approx(fit_regression([], 1).history["loss"][0]))


def test_divergence_by_growth_over_a_window():
    alerts = Alerts()
    plugin = StallAlert(timeout=None, check_every=None, throughput_drop=None, divergence_factor=10, divergence_window=2)
    history = fit_regression([plugin, ScaleWeights(3.0), alerts], epochs=4)  # loss x9 per epoch
    losses = history.history["loss"]
    assert losses[2] / losses[0] == pytest.approx(81, rel=1e-3)
    (divergence,) = alerts.alerts
    assert (divergence.kind, divergence.level, divergence.epoch) == ("divergence", "error", 2)
    assert "81.0x the lowest of the previous 2 epochs" in divergence.text


def test_divergence_above_a_threshold_is_caught_at_the_loss_check():
    first_loss = fit_regression([], 1).history["loss"][0]
    alerts = Alerts()
    plugin = StallAlert(
        timeout=None, check_every=3, throughput_drop=None, divergence_factor=None, divergence_threshold=first_loss * 5
    )
    fit_regression([plugin, ScaleWeights(3.0), alerts], epochs=3)  # epoch 1: 9x the first loss
    (divergence,) = alerts.alerts
    assert divergence.kind == "divergence" and divergence.step == 15  # first check of epoch 1
    assert "above divergence_threshold" in divergence.text


class SlowDownAfter:
    def __init__(self, step, seconds):
        self.step, self.seconds = step, seconds

    @hookimpl
    def on_train_batch_end(self, trainer):
        if trainer.global_step > self.step:
            time.sleep(self.seconds)


def test_throughput_drop_is_alerted_when_sustained():
    x, y = tiny_data()
    alerts = Alerts()
    plugin = StallAlert(
        timeout=None,
        check_every=None,
        divergence_factor=None,
        throughput_drop=0.5,
        throughput_every=8,
        throughput_windows=3,
    )
    make_trainer([plugin, alerts, SlowDownAfter(72, 0.03)]).fit(x, y, epochs=10, validation_split=0.0, **FIT)
    (drop,) = alerts.alerts
    assert drop.kind == "throughput_drop" and 72 + 3 * 8 <= drop.step <= 72 + 5 * 8
    assert "steps/s over the last 24 steps" in drop.text


def test_state_round_trips_through_json_with_the_gate():
    alerts = Alerts()
    plugin = StallAlert(timeout=None, patience=1, monitor="loss", check_every=1, throughput_drop=None)
    make_trainer([plugin, alerts], optimizer=keras.optimizers.SGD(0.01)).fit(*nan_data(), epochs=1, **FIT)
    state = json.loads(json.dumps(plugin.state_dict()))
    assert state["alerted"] == ["nan_loss"] and "nan_loss" in state["gate"]["last_sent"]
    resumed = StallAlert(timeout=None, patience=1, monitor="loss", check_every=1, throughput_drop=None)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    trainer = make_trainer([resumed, alerts], optimizer=keras.optimizers.SGD(0.01))
    trainer.fit(*nan_data(), epochs=1, **FIT)
    assert trainer.alert_gate.state_dict()["last_sent"]["nan_loss"] == state["gate"]["last_sent"]["nan_loss"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(timeout=0), "timeout=0"),
        (dict(check_every=0), "check_every=0"),
        (dict(patience=1.5), "patience=1.5"),
        (dict(throughput_drop=2), "throughput_drop=2"),
        (dict(divergence_factor=1), "divergence_factor=1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        StallAlert(**kwargs)


def test_by_name_with_params_and_a_webhook_from_the_environment(monkeypatch):
    with Receiver() as receiver:
        monkeypatch.setenv("COREBUS_ALERT_WEBHOOK_URL", receiver.url)
        trainer = make_trainer(
            [
                {"name": "stall_alert", **WATCHDOG},
                {"name": "alert_webhook", "format": "json"},
                SleepAt(2, TIMEOUT + 1.0),
            ]
        )
        trainer.fit(*tiny_data(), epochs=1, **FIT)
        params = json.dumps(trainer.run_params())
        assert receiver.url not in params and "secret-token" not in params
        assert [b["kind"] for b in receiver.bodies()] == ["stall", "stall_resolved"]
        assert "Thread MainThread" in receiver.bodies()[0]["details"]


class StepClock:
    def __init__(self):
        self.times = []

    @hookimpl
    def on_train_batch_end(self):
        self.times.append(time.perf_counter())


def test_a_receiver_that_never_answers_does_not_slow_training():
    x, y = tiny_data()
    clock = StepClock()
    with Receiver(hang=True) as receiver:
        webhook = AlertWebhook(url=receiver.url, timeout=1.0, shutdown_timeout=1.0)
        trainer = make_trainer([StallAlert(**WATCHDOG), webhook, SleepAt(3, TIMEOUT + 0.5), clock])
        trainer.fit(x, y, epochs=3, **FIT)
        ended = time.perf_counter()
        assert receiver.wait_for(1, timeout=1)  # the stall POST arrived and hangs there
    gaps = [b - a for a, b in zip(clock.times[3:], clock.times[4:])]
    assert max(gaps) < 0.5  # no step after the stall waits on the stuck receiver
    assert ended - clock.times[-1] < 1.0 + 1.5  # closing the stuck notifier is bounded
