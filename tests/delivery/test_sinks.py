"""The shared delivery machinery: a slow or dead backend never blocks, nothing is lost."""

import shutil
import threading
import time
from pathlib import Path

from corebus import LogSink, Spool, read_spool, redact, replay_spool


class Backend:
    def __init__(self):
        self.up = True
        self.delay = 0.0
        self.received = []
        self.lock = threading.Lock()

    def send(self, records):
        time.sleep(self.delay)
        if not self.up:
            raise ConnectionError("backend down")
        with self.lock:
            self.received.extend(records)


def records(n, start=0):
    return [{"type": "metrics", "step": i, "values": {"loss": float(i)}} for i in range(start, start + n)]


def test_put_never_waits_on_a_slow_backend():
    backend = Backend()
    backend.delay = 0.5
    sink = LogSink("slow", backend.send, flush_interval=0.01)
    start = time.perf_counter()
    for record in records(500):
        sink.put(record)
    assert time.perf_counter() - start < 0.2
    assert sink.close(timeout=10)
    assert [r["step"] for r in backend.received] == list(range(500))


def test_outage_spools_and_everything_arrives_once_in_order(tmp_path):
    backend = Backend()
    spool = Spool(tmp_path / "mlflow.spool.jsonl", {"plugin": "mlflow", "config": {}})
    sink = LogSink("flaky", backend.send, spool=spool, flush_interval=0.01, max_backoff=0.2)
    for record in records(50):
        sink.put(record)
    time.sleep(0.3)
    backend.up = False
    for record in records(50, start=50):
        sink.put(record)
    time.sleep(0.5)
    assert spool.path.exists() and len(spool) > 0  # durable while the backend is down
    backend.up = True
    for record in records(50, start=100):
        sink.put(record)
    assert sink.close(timeout=10)
    steps = [r["step"] for r in backend.received]
    assert sorted(steps) == list(range(150)) and len(steps) == len(set(steps))
    assert sink.stats["failures"] >= 1 and sink.stats["retries"] >= 1
    assert not spool.path.exists()


def test_shutdown_is_bounded_and_leftovers_stay_in_the_spool(tmp_path, caplog):
    backend = Backend()
    backend.up = False
    spool = Spool(tmp_path / "dead.spool.jsonl", {"plugin": "mlflow", "config": {"run_id": "r1"}})
    sink = LogSink("dead", backend.send, spool=spool, flush_interval=0.01)
    for record in records(20):
        sink.put(record)
    start = time.perf_counter()
    assert sink.close(timeout=1.0) is False
    assert time.perf_counter() - start < 3.0
    header, spooled = read_spool(spool.path)
    assert header["plugin"] == "mlflow" and header["config"] == {"run_id": "r1"}
    assert [r["step"] for r in spooled] == list(range(20))
    assert "corebus sync" in caplog.text


def test_queue_overflow_goes_to_the_spool_not_the_floor(tmp_path):
    backend = Backend()
    backend.delay = 0.2
    spool = Spool(tmp_path / "o.spool.jsonl", {"plugin": "x", "config": {}})
    sink = LogSink("small", backend.send, spool=spool, max_queue=5, batch_size=5, flush_interval=0.01)
    for record in records(100):
        sink.put(record)
    assert sink.stats["overflow"] > 0
    assert sink.close(timeout=20)
    assert sorted(r["step"] for r in backend.received) == list(range(100))


def test_torn_last_line_of_a_spool_is_ignored(tmp_path):
    path = tmp_path / "t.spool.jsonl"
    Spool(path, {"plugin": "x"}).append(records(3))
    with open(path, "a") as handle:
        handle.write('{"type": "metrics", "st')
    assert [r["step"] for r in read_spool(path)[1]] == [0, 1, 2]


def test_redact_hides_secrets():
    config = {"url": "https://hooks.example/abc", "api_key": "k", "monitor": "val_loss", "nested": {"token": "t"}}
    assert redact(config) == {"url": "***", "api_key": "***", "monitor": "val_loss", "nested": {"token": "***"}}


def test_a_send_stuck_at_shutdown_is_spooled_first(tmp_path):
    release = threading.Event()
    received = []

    def send(batch):
        if not release.is_set():
            release.wait(5)
            raise TimeoutError("stuck")
        received.extend(batch)

    spool = Spool(tmp_path / "s.spool.jsonl", {"plugin": "x"})
    sink = LogSink("stuck", send, spool=spool, flush_interval=0.01, batch_size=3)
    for record in records(3):
        sink.put(record)
    time.sleep(0.2)  # the first batch is now in flight
    for record in records(3, start=3):
        sink.put(record)
    assert sink.close(timeout=0.5) is False
    release.set()
    assert [r["step"] for r in read_spool(spool.path)[1]] == list(range(6))


def test_replay_waits_for_a_slow_backend_and_keeps_what_a_failure_left(tmp_path, caplog):
    path = tmp_path / "x.spool.jsonl"
    Spool(path, {"plugin": "x"}).append([{"type": "log", "step": s} for s in range(5)])
    delivered = []

    def flaky(batch):
        time.sleep(0.2)  # a slow backend: a sync waits, it has no shutdown bound
        if batch[0]["step"] == 3:
            raise ConnectionError("backend went away")
        delivered.extend(batch)

    assert replay_spool(path, flaky, what="x", batch_size=1) == 3
    assert [r["step"] for r in delivered] == [0, 1, 2]
    header, left = read_spool(path)
    assert header["plugin"] == "x" and [r["step"] for r in left] == [3, 4]
    assert "x: replay of" in caplog.text and "stopped after 3 of 5 records: ConnectionError" in caplog.text

    assert replay_spool(path, delivered.extend, what="x") == 2  # the next sync delivers the rest
    assert [r["step"] for r in delivered] == [0, 1, 2, 3, 4] and not path.exists()


# ---------------------------------------------------------------------- LoggerOutbox: every logger's delivery


def test_a_logger_outbox_opens_at_its_first_record_and_sends_held_records_first(tmp_path):
    from corebus.kit import LoggerOutbox, OutboxTarget

    backend, opened = Backend(), []

    def opener():  # a logger's: decided only now (a snapshot restore may have changed the run)
        opened.append(True)
        outbox.hold({"type": "start"})  # the run's first record
        return OutboxTarget(backend.send, tmp_path, "run-7", {"plugin": "x"}, fields={"run": "7"})

    outbox = LoggerOutbox("x", opener, owner="XLogger", shutdown_timeout=5)
    outbox.hold({"type": "alert", "run": None})  # before the run is settled (a watchdog's alert)
    assert not outbox.is_open and not opened and outbox.flush() and outbox.stats == {}
    outbox.put({"type": "metrics", "run": "7"})
    assert outbox.is_open and opened == [True]
    assert outbox.flush()
    assert backend.received == [
        {"type": "start", "run": "7"},
        {"type": "alert", "run": "7"},
        {"type": "metrics", "run": "7"},
    ]
    assert outbox.close() and not outbox.is_open and outbox.stats["sent"] == 3
    outbox.put({"type": "metrics", "run": "7"})  # the next fit opens it again
    assert opened == [True, True]
    outbox.close()


def test_a_logger_outbox_spools_what_a_dead_backend_did_not_take_and_replays_it(tmp_path, caplog):
    from corebus.kit import LoggerOutbox, OutboxTarget

    backend = Backend()
    backend.up = False
    closed = []
    target = OutboxTarget(backend.send, tmp_path, "run-1", {"plugin": "x"}, close=lambda: closed.append(True))
    outbox = LoggerOutbox("x", lambda: target, owner="XLogger", shutdown_timeout=0.5)
    for record in records(3):
        outbox.put(record)
    assert outbox.flush()  # spooled on disk counts: a kill now loses nothing
    assert not outbox.close() and closed == [True]
    assert read_spool(tmp_path / "run-1.spool.jsonl")[1] == records(3)
    backend.up = True
    assert LoggerOutbox.replay(tmp_path / "run-1.spool.jsonl", backend.send, owner="XLogger") == 3
    assert backend.received == records(3) and not (tmp_path / "run-1.spool.jsonl").exists()


def test_a_logger_outbox_says_when_a_snapshot_flush_ran_out_of_time(tmp_path, caplog):
    from corebus.kit import LoggerOutbox, OutboxTarget

    backend = Backend()
    backend.delay = 1.0
    outbox = LoggerOutbox(
        "x", lambda: OutboxTarget(backend.send, tmp_path, "slow", {}), owner="XLogger", shutdown_timeout=0.2
    )
    outbox.put(records(1)[0])
    assert not outbox.flush()
    assert "XLogger: records not delivered within 0 s of a snapshot" in caplog.text
    outbox.shutdown_timeout = 5
    assert outbox.close()


def test_staged_files_survive_their_rotation_and_the_staging_folder_goes_when_empty(tmp_path):
    from corebus.kit import LoggerOutbox, OutboxTarget

    uploaded = []

    def send(batch):  # an uploader removes what it sent, with its folder (as MLflow's writer does)
        for record in batch:
            uploaded.append(Path(record["path"]).read_text())
            shutil.rmtree(Path(record["path"]).parent)

    outbox = LoggerOutbox("x", lambda: OutboxTarget(send, tmp_path, "run-2", {}), owner="XLogger", shutdown_timeout=5)
    checkpoint = tmp_path / "ckpt" / "001.weights.h5"
    checkpoint.parent.mkdir()
    checkpoint.write_text("weights of step 1")
    staged = [outbox.stage(checkpoint), outbox.stage(checkpoint)]
    checkpoint.unlink()  # rotated away (save_top_k) before the upload
    assert [p.parent.parent for p in staged] == [tmp_path / "run-2.staging"] * 2 and staged[0] != staged[1]
    assert staged[0].name == "001.weights.h5" and staged[0].read_text() == "weights of step 1"
    for path in staged:
        outbox.put({"path": str(path)})
    assert outbox.close()
    assert uploaded == ["weights of step 1"] * 2 and not (tmp_path / "run-2.staging").exists()


def test_run_status_says_how_a_run_ended():
    import signal

    from corebus import Preempted
    from corebus.kit import run_status

    assert run_status(None) == "FINISHED"
    assert run_status(ValueError("boom")) == "FAILED"
    assert run_status(KeyboardInterrupt()) == "KILLED"
    assert run_status(Preempted(signal.SIGTERM)) == "KILLED"
