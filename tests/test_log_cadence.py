"""Batch ``on_log`` calls follow the subscribers' declared ``batch_log_cadence``: skipped after
train calls where no subscriber is due, in the engine and in ``model.fit``."""

import keras
import pytest

import corebus
from corebus import Cadence, hookimpl
from corebus.integrations import MLflowLogger
from corebus.testing import make_trainer, tiny_data, tiny_model  # noqa: F401


class LogSpy:
    """Records the steps of every batch on_log call it gets, and how many epoch calls."""

    def __init__(self, **declared):
        self.__dict__.update(declared)  # batch_log_cadence, when given
        self.batch_steps, self.epochs = [], 0

    @hookimpl
    def on_log(self, kind, step):
        if kind == "batch":
            self.batch_steps.append(step)
        else:
            self.epochs += 1


def _train(mode, plugins, steps_per_execution, tiny_data):  # noqa: F811
    x, y = tiny_data  # 96 samples, batch 16: 6 steps per epoch, 12 in all
    if mode == "engine":
        trainer = make_trainer(plugins, steps_per_execution=steps_per_execution)
        trainer.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    else:
        model = tiny_model()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                      steps_per_execution=steps_per_execution)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, callbacks=[corebus.KerasCallback(plugins)])


def _due(cadences, steps_per_execution, total=12):
    """The steps that end a train call crossing a due step of any cadence (independent arithmetic)."""
    ends = range(steps_per_execution, total + 1, steps_per_execution)
    return [end for end in ends
            if any(step % every == 0 for step in range(end - steps_per_execution + 1, end + 1) for every in cadences)]


@pytest.mark.parametrize("mode", ["engine", "model.fit"])
@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_batch_calls_come_only_when_some_subscriber_is_due(tiny_data, mode, steps_per_execution):  # noqa: F811
    every_3, every_4 = LogSpy(batch_log_cadence=Cadence.every_n(3)), LogSpy(batch_log_cadence=Cadence.every_n(4))
    epoch_only = LogSpy(batch_log_cadence=None)
    _train(mode, [every_3, every_4, epoch_only], steps_per_execution, tiny_data)
    expected = _due([3, 4], steps_per_execution)
    assert expected == ([3, 4, 6, 8, 9, 12] if steps_per_execution == 1 else [4, 6, 8, 10, 12])
    # every subscriber gets the call when any is due (each checks its own cadence)
    assert every_3.batch_steps == every_4.batch_steps == epoch_only.batch_steps == expected
    assert every_3.epochs == every_4.epochs == epoch_only.epochs == 2


@pytest.mark.parametrize("mode", ["engine", "model.fit"])
def test_a_subscriber_without_a_declared_cadence_gets_every_call(tiny_data, mode):  # noqa: F811
    every_5, undeclared = LogSpy(batch_log_cadence=Cadence.every_n(5)), LogSpy()
    _train(mode, [every_5, undeclared], 1, tiny_data)
    assert undeclared.batch_steps == every_5.batch_steps == list(range(1, 13))


def test_epoch_only_subscribers_get_no_batch_calls(tiny_data):  # noqa: F811
    spies = [LogSpy(batch_log_cadence=None), LogSpy(batch_log_cadence=None)]
    _train("engine", spies, 1, tiny_data)
    assert [s.batch_steps for s in spies] == [[], []] and [s.epochs for s in spies] == [2, 2]


def test_the_loggers_declare_their_cadence(tmp_path):
    from corebus.integrations import TensorBoardLogger, WandbLogger
    from corebus.plugins.report import RunReport

    assert MLflowLogger(dir=tmp_path, log_every_n_steps=7).batch_log_cadence == Cadence.every_n(7)
    assert WandbLogger(mode="disabled", dir=tmp_path, log_every_n_steps=7).batch_log_cadence == Cadence.every_n(7)
    assert TensorBoardLogger(log_dir=tmp_path / "tb", update_freq=7).batch_log_cadence == Cadence.every_n(7)
    assert TensorBoardLogger(log_dir=tmp_path / "tb").batch_log_cadence is None  # update_freq="epoch"
    assert RunReport(report_dir=tmp_path / "r", log_every_n_steps=None).batch_log_cadence is None


class HandOffSpy:
    """After the logger's own on_log, how many points it still holds (not handed to its sink)."""

    def __init__(self, logger):
        self.logger, self.held = logger, []
        self.batch_log_cadence = logger.batch_log_cadence

    @hookimpl(trylast=True)
    def on_log(self, kind):
        if kind == "batch":
            self.held.append(len(self.logger._points))


def _logger(kind, tmp_path):
    from corebus.integrations import TensorBoardLogger, WandbLogger

    if kind == "mlflow":
        return MLflowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", dir=tmp_path / "spool", log_every_n_steps=4)
    if kind == "wandb":
        return WandbLogger(mode="disabled", dir=tmp_path, log_every_n_steps=4)
    return TensorBoardLogger(log_dir=tmp_path / "tb", update_freq=4)


# After steps 4, 8 and 12 (epoch 0 ends at step 6). MLflow holds epoch values as points too;
# TensorBoard and W&B hand their points over before an epoch record, to keep the order.
HELD_WITHIN_THE_INTERVAL = {"mlflow": [0, 2, 3], "wandb": [0, 1, 2], "tensorboard": [0, 1, 2]}


@pytest.mark.parametrize("kind", sorted(HELD_WITHIN_THE_INTERVAL))
def test_loggers_hold_points_until_the_interval_and_hand_one_over_at_once_after_it(
        kind, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    # Within the interval, points are held (read later, in one go). The first point goes at
    # once, so the backend starts early.
    monkeypatch.setattr("corebus.sinks.LOGGER_FLUSH_SECONDS", 60.0)
    spy = HandOffSpy(_logger(kind, tmp_path / "held"))
    _train("engine", [spy.logger, spy], 1, tiny_data)
    assert spy.held == HELD_WITHIN_THE_INTERVAL[kind]

    # The hook is called only at due steps: a point must not wait for the next one once the
    # interval has passed (here 0 s: every point goes at its own step).
    monkeypatch.setattr("corebus.sinks.LOGGER_FLUSH_SECONDS", 0.0)
    spy = HandOffSpy(_logger(kind, tmp_path / "at_once"))
    _train("engine", [spy.logger, spy], 1, tiny_data)
    assert spy.held == [0, 0, 0]
