"""A snapshot counts only once the records of its steps are delivered or on disk.

In-process pieces of the kill-anywhere guarantee (tests/chaos/test_kill_anywhere.py kills real
processes): ``LogSink.flush``, the loggers' ``state_dict()`` taken for a snapshot, the report's
state carried by a snapshot, and the status of a run stopped by a signal.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

import corebus
from corebus import LogSink, Spool, hookimpl, read_spool
from corebus.testing import make_trainer, tiny_data

FIT = dict(batch_size=16, verbose=0, shuffle=False)


def test_flush_waits_until_every_record_put_is_delivered():
    delivered, release = [], threading.Event()

    def send(records):
        release.wait(5)
        delivered.extend(records)

    sink = LogSink("slow", send, flush_interval=30.0)  # the interval alone would wait 30 s
    for i in range(5):
        sink.put({"step": i})
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    assert sink.flush(10)
    assert [r["step"] for r in delivered] == list(range(5))
    assert time.monotonic() - started < 5
    sink.close(1)


def test_flush_counts_records_spooled_by_a_failing_backend_as_settled(tmp_path):
    def send(records):
        raise ConnectionError("tracker down")

    spool = Spool(tmp_path / "x.spool.jsonl", {"plugin": "x"})
    sink = LogSink("down", send, spool=spool, flush_interval=30.0)
    for i in range(3):
        sink.put({"step": i})
    assert sink.flush(10)  # not waiting for the tracker: the records are on disk
    assert [r["step"] for r in read_spool(spool.path)[1]] == [0, 1, 2]
    sink.close(0.1)


def test_flush_gives_up_after_its_timeout():
    sink = LogSink("stuck", lambda records: time.sleep(3), flush_interval=30.0)
    sink.put({"step": 1})
    started = time.monotonic()
    assert not sink.flush(0.3)
    assert time.monotonic() - started < 2
    sink.close(0.1)


class SnapshotAt:
    """Takes the trainer's run state (what a snapshot captures) at one step, and keeps what
    the TensorBoard event files held at that moment."""

    def __init__(self, step, log_dir):
        self.step, self.log_dir, self.events_then = step, log_dir, None

    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer):
        if trainer.global_step == self.step:
            self.state = trainer._run_state()
            self.events_then = read_steps(self.log_dir)


def read_steps(log_dir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = {}
    for path in sorted(log_dir.glob("*/events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_a_snapshot_finds_the_points_of_its_steps_written(tmp_path):
    """Points are handed over every 2 s; the run state of step 7 (what a snapshot captures)
    is taken only after steps 1..7 are in the event files (before: only step 1 was)."""
    from corebus.integrations import TensorBoardLogger

    x, y = tiny_data(n=160)
    watcher = SnapshotAt(7, tmp_path / "tb")
    make_trainer([TensorBoardLogger(tmp_path / "tb", update_freq=1), watcher]).fit(x, y, epochs=1, **FIT)
    assert watcher.events_then["batch_loss"] == list(range(1, 8))


def test_the_report_keeps_the_run_before_a_resume(tmp_path):
    from corebus.plugins import BackupAndRestore, RunReport

    x, y = tiny_data(n=96)  # 6 steps an epoch

    class CrashAt9:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 9:
                raise RuntimeError("power cut")

    backup = str(tmp_path / "backup")
    with pytest.raises(corebus.PluginError):
        make_trainer(
            [
                BackupAndRestore(backup, save_freq=2, background=False),
                RunReport(tmp_path / "report", log_every_n_steps=1),
                CrashAt9(),
            ]
        ).fit(x, y, epochs=3, **FIT)
    make_trainer(
        [BackupAndRestore(backup, save_freq=2, background=False), RunReport(tmp_path / "report", log_every_n_steps=1)]
    ).fit(x, y, epochs=3, **FIT)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["batches"]["step"] == list(range(1, 19))  # from the first step, each once (was 9..18)
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    assert report["run"]["first_step"] == 0 and report["run"]["status"] == "finished"


def test_a_run_stopped_by_a_signal_is_killed_not_failed(tmp_path):
    from corebus.integrations import TensorBoardLogger
    from corebus.plugins import RunReport

    class Stop:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 2:
                raise corebus.Preempted(signal.SIGTERM)

    x, y = tiny_data(n=64)
    with pytest.raises(SystemExit):
        make_trainer([TensorBoardLogger(tmp_path / "tb"), RunReport(tmp_path / "report"), Stop()]).fit(
            x, y, epochs=2, **FIT
        )
    assert json.loads((tmp_path / "report" / "report.json").read_text())["run"]["status"] == "killed"
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    texts = [
        value.tensor.string_val[0].decode()
        for path in (tmp_path / "tb" / "train").glob("events.*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == "run_status"
    ]
    assert texts == ["KILLED"]


def test_a_resumed_wandb_run_still_logs_what_its_last_delivered_step_lacked(tmp_path):
    """The interrupted process delivered step 12's batch points (a snapshot flushed them) but
    not the epoch record of step 12: the resumed run skips what went, not the whole step."""
    from corebus.integrations import WandbLogger

    class Recorder:  # the sink's place: what the logger hands over
        def __init__(self):
            self.records = []

        def put(self, record):
            self.records.append(record)

    logger = WandbLogger(mode="offline", dir=str(tmp_path))
    logger.run_id = "abc123"
    (tmp_path / "wandb-abc123.step").write_text(json.dumps({"step": 12, "keys": ["_timestamp", "batch/loss"]}))
    logger.on_state_restored(step=10)
    logger._outbox = sink = Recorder()
    for step, values in (
        (11, {"batch/loss": 1.0}),
        (12, {"batch/loss": 1.0, "_timestamp": 5.0}),
        (12, {"epoch/loss": 0.5, "epoch/epoch": 0, "_timestamp": 6.0}),
        (13, {"batch/loss": 0.9}),
    ):
        logger._put({"type": "log", "step": step, "values": values})
    assert [(r["step"], sorted(r["values"])) for r in sink.records] == [
        (12, ["_timestamp", "epoch/epoch", "epoch/loss"]),
        (13, ["batch/loss"]),
    ]
