"""Batch ``on_log`` calls follow the subscribers' declared ``batch_log_cadence``: skipped after
train calls where no subscriber is due, in the engine and in ``model.fit``."""

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
        model.compile(
            optimizer="adam",
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution,
        )
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, callbacks=[corebus.KerasCallback(plugins)])


def _due(cadences, steps_per_execution, total=12):
    """The steps that end a train call crossing a due step of any cadence (independent arithmetic)."""
    ends = range(steps_per_execution, total + 1, steps_per_execution)
    return [
        end
        for end in ends
        if any(step % every == 0 for step in range(end - steps_per_execution + 1, end + 1) for every in cadences)
    ]


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
    """Runs after the logger's on_log_steps: the steps each hand-over brought, and how many
    records the logger's sink had taken by then (the logger holds none back)."""

    def __init__(self, logger):
        self.logger, self.deliveries, self.queued = logger, [], []
        self.batch_log_cadence = logger.batch_log_cadence

    @hookimpl(trylast=True)
    def on_log_steps(self, records):
        self.deliveries.append([record.step for record in records])
        self.queued.append(self.logger._outbox.stats.get("queued", 0))


def _logger(kind, tmp_path):
    from corebus.integrations import TensorBoardLogger, WandbLogger

    if kind == "mlflow":
        return MLflowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", dir=tmp_path / "spool", log_every_n_steps=4)
    if kind == "wandb":
        return WandbLogger(mode="disabled", dir=tmp_path, log_every_n_steps=4)
    return TensorBoardLogger(log_dir=tmp_path / "tb", update_freq=4)


@pytest.mark.parametrize("kind", ["mlflow", "tensorboard", "wandb"])
@pytest.mark.parametrize("mode", ["engine", "model.fit"])
def test_loggers_get_batch_records_in_bulk_at_the_interval_and_before_each_epoch_record(
    kind,
    mode,
    tiny_data,  # noqa: F811 (the fixture)
    tmp_path,
    monkeypatch,
):
    # Within the interval the engine holds the records; the first goes at once (the backend
    # starts early), the rest before the epoch's on_log. Each hand-over reaches the sink whole.
    monkeypatch.setattr("corebus.delivery.sinks.LOGGER_FLUSH_SECONDS", 60.0)
    spy = HandOffSpy(_logger(kind, tmp_path / "held"))
    _train(mode, [spy.logger, spy], 1, tiny_data)
    assert spy.deliveries == [[4], [8, 12]]  # steps 4, 8 and 12; epoch 0 ends at step 6
    assert 0 < spy.queued[0] < spy.queued[1]  # each hand-over reached the sink at once

    # Once the interval has passed, a record goes at its own step (here 0 s: every one).
    monkeypatch.setattr("corebus.delivery.sinks.LOGGER_FLUSH_SECONDS", 0.0)
    spy = HandOffSpy(_logger(kind, tmp_path / "at_once"))
    _train(mode, [spy.logger, spy], 1, tiny_data)
    assert spy.deliveries == [[4], [8], [12]]
    assert 0 < spy.queued[0] < spy.queued[1] < spy.queued[2]


class StepsSpy:
    """Takes batch records through on_log_steps (and epoch records through on_log)."""

    def __init__(self, **declared):
        self.__dict__.update(declared)
        self.records, self.events = [], []

    @hookimpl
    def on_log_steps(self, records):
        self.events.append(("steps", [record.step for record in records]))
        self.records += [(r.step, r.previous_step, dict(r.logs)) for r in records]

    @hookimpl
    def on_log(self, kind, step):
        self.events.append((kind, step))


class ValuesSpy(LogSpy):
    @hookimpl
    def on_log(self, trainer, kind, step, logs):
        if kind == "batch":
            self.batch_steps.append((step, trainer.previous_global_step, dict(logs)))


@pytest.mark.parametrize("mode", ["engine", "model.fit"])
@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_bulk_records_hold_what_on_log_would_have_had(tiny_data, mode, steps_per_execution):  # noqa: F811
    every_3 = Cadence.every_n(3)
    bulk, each = StepsSpy(batch_log_cadence=every_3), ValuesSpy(batch_log_cadence=every_3)
    _train(mode, [bulk, each], steps_per_execution, tiny_data)
    assert [step for step, _, _ in bulk.records] == _due([3], steps_per_execution)
    # the same steps, the same step values (the own loss and accuracy, the learning rate)
    assert bulk.records == each.batch_steps
    assert {"loss", "accuracy", "learning_rate"} <= set(bulk.records[0][2])
    # the subscriber of on_log_steps gets no batch on_log; its records come before the epoch's
    kinds = [event[0] for event in bulk.events]
    assert "batch" not in kinds and kinds.count("epoch") == 2
    for i, event in enumerate(bulk.events):
        if event[0] == "epoch":
            assert bulk.events[i - 1][0] == "steps" and bulk.events[i - 1][1][-1] <= event[1]


def test_bulk_records_are_handed_over_when_training_fails(tiny_data, monkeypatch):  # noqa: F811
    monkeypatch.setattr("corebus.delivery.sinks.LOGGER_FLUSH_SECONDS", 60.0)

    class FailAtStep5:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 5:
                raise RuntimeError("boom")

    class Ended(StepsSpy):
        @hookimpl
        def on_exception(self):
            self.events.append(("exception",))

    spy = Ended()  # no declared cadence: every call
    with pytest.raises(corebus.PluginError):
        _train("engine", [spy, FailAtStep5()], 1, tiny_data)
    # step 5's on_train_batch_end raised: as for on_log, no record of it
    assert spy.events == [("steps", [1]), ("steps", [2, 3, 4]), ("exception",)]


def test_bulk_records_are_bounded(tiny_data, monkeypatch):  # noqa: F811
    monkeypatch.setattr("corebus.delivery.sinks.LOGGER_FLUSH_SECONDS", 60.0)
    monkeypatch.setattr("corebus.engine.dispatch.HELD_STEPS_MAX", 2)
    spy = StepsSpy()
    _train("engine", [spy], 1, tiny_data)
    assert [event[1] for event in spy.events if event[0] == "steps"] == [
        [1],
        [2, 3],
        [4, 5],
        [6],
        [7, 8],
        [9, 10],
        [11, 12],
    ]
