"""MLflowLogger against a real ``mlflow server`` (sqlite store, one per module), read back with
``MlflowClient``: every metric at its step, params, artifacts, status, outages, resume, sync."""

import os
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

import corebus
from corebus import ConfigError, KerasCallback, MissingExtraError, PluginError, hookimpl
from corebus.integrations import MLflowLogger
from corebus.plugins import BackupAndRestore, ModelCheckpoint
from corebus.testing import make_trainer, tiny_data, tiny_model

from mlflow_server import mlflow_server  # noqa: F401  (the module-scoped server fixture)

SECRET = "https://hooks.example.com/services/T000/B000/very-secret"
HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


@pytest.fixture
def server(mlflow_server):  # noqa: F811
    mlflow_server.start()  # a failed outage test must not take the others down with it
    return mlflow_server


class Recorder:
    """What the plugins saw: global step and logs of every train call, announced checkpoints."""

    def __init__(self):
        self.steps, self.logs, self.checkpoints = [], {}, []

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.steps.append(trainer.global_step)

    @hookimpl
    def on_log(self, kind, step, logs):
        if kind == "batch":  # what every logger gets: the step's own values (engine)
            self.logs[step] = dict(logs)

    @hookimpl
    def on_checkpoint_saved(self, filepath):
        self.checkpoints.append(filepath)


class Notifier:
    """A plugin with a secret, a very long value and a very long name among its params."""

    def get_config(self):
        return {"webhook_url": SECRET, "notes": "n" * 7000, "k" * 300: 1}

    @hookimpl
    def on_train_end(self):
        pass


class FailAt:
    def __init__(self, step, error):
        self.step, self.error = step, error

    @hookimpl
    def on_train_batch_end(self, trainer):
        if trainer.global_step >= self.step:
            raise self.error


def logger(server, tmp_path, **kwargs):
    kwargs.setdefault("experiment_name", "corebus-tests")
    kwargs.setdefault("shutdown_timeout", 10)
    return MLflowLogger(tracking_uri=server.uri, dir=tmp_path / "mlflow", **kwargs)


def fit(mode, plugins, x, y, epochs=2, spe=1, validation_split=0.0):
    kwargs = dict(batch_size=8, epochs=epochs, validation_split=validation_split, verbose=0, shuffle=False)
    if mode == "engine":
        trainer = make_trainer(plugins, steps_per_execution=spe)
        return trainer.model, trainer.fit(x, y, **kwargs).history
    model = tiny_model()
    callback = KerasCallback(plugins)
    model.compile(
        optimizer=callback.wrap_optimizer("sgd"),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=spe,
    )
    return model, model.fit(x, y, callbacks=[callback], **kwargs).history


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def run_of(client, mlflow_logger):
    """The run, found by the tag naming it (the logger may not have seen its id: sync made it)."""
    (run,) = client.search_runs(
        [client.get_experiment_by_name("corebus-tests").experiment_id],
        f"tags.`corebus.run_key` = '{mlflow_logger.state_dict()['run_key']}'",
    )
    return run


def steps_of(client, run_id, key):
    return [step for step, _ in history(client, run_id, key)]


@pytest.mark.parametrize("mode", ["engine", "keras"])
def test_every_metric_param_and_artifact_reaches_the_server(server, tmp_path, mode):
    env_before = {name: os.environ.get(name) for name in HTTP_ENV}
    x, y = tiny_data(96)
    recorder = Recorder()
    # Background writes: the last file is announced in the checkpoint's on_train_end, which
    # runs after the logger's in list order; the logger must still upload it.
    checkpoint = ModelCheckpoint(
        str(tmp_path / "ckpt" / "ep{epoch:02d}.weights.h5"),
        save_weights_only=True,
        monitor="val_loss",
        save_top_k=1,
        background=True,
    )
    mlflow_logger = logger(
        server,
        tmp_path,
        run_name=f"tiny-{mode}",
        log_every_n_steps=4,
        log_model=True,
        tags={"team": "corebus"},
        shutdown_timeout=120,
    )
    # 72 train samples, batch 8, 3 steps per call: calls end at steps 3, 6, 9 | 12, 15, 18.
    model, hist = fit(mode, [recorder, Notifier(), mlflow_logger, checkpoint], x, y, spe=3, validation_split=0.25)
    assert recorder.steps == [3, 6, 9, 12, 15, 18]

    client = server.client()
    run = client.get_run(mlflow_logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"tiny-{mode}"
    assert run.data.tags["team"] == "corebus"
    assert run.data.tags["corebus.run_key"] == mlflow_logger.state_dict()["run_key"]

    # Batch metrics: at the first call end at or after each multiple of 4 (4->6, 8->9, 12, 16->18).
    expected = sorted({min(s for s in recorder.steps if s >= m) for m in range(4, recorder.steps[-1] + 1, 4)})
    assert expected == [6, 9, 12, 18]
    for key in ("loss", "accuracy"):
        seen = [(s, pytest.approx(recorder.logs[s][key], rel=1e-12)) for s in expected]
        assert history(client, run.info.run_id, key) == seen
    # Epoch metrics: every one of them, per epoch, at the step the epoch ended on.
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        per_epoch = [(9, pytest.approx(hist[key][0])), (18, pytest.approx(hist[key][1]))]
        assert history(client, run.info.run_id, f"epoch/{key}") == per_epoch
    assert history(client, run.info.run_id, "epoch") == [(9, 0.0), (18, 1.0)]
    assert steps_of(client, run.info.run_id, "epoch/learning_rate") == [9, 18]
    assert "learning_rate" not in run.data.metrics  # per epoch only: a point per step costs as much as the loss

    params = run.data.params
    assert params["fit.epochs"] == "2" and params["fit.steps"] == "9"
    assert float(params["optimizer.default.learning_rate"]) == pytest.approx(0.01)
    assert params["plugins.ModelCheckpoint.monitor"] == "val_loss"
    assert params["plugins.MLflowLogger.experiment_name"] == "corebus-tests"
    assert params["plugins.Notifier.webhook_url"] == "***"
    assert not any(SECRET in value for value in params.values())
    assert len(params["plugins.Notifier.notes"]) == 6000 and params["plugins.Notifier.notes"].endswith("...")
    (long_key,) = [k for k in params if k.startswith("plugins.Notifier.kkk")]
    assert len(long_key) == 250

    # The run holds the checkpoints the checkpoint plugin kept (log_checkpoints="kept"): ep01
    # was uploaded when announced and removed once save_top_k deleted it locally.
    announced = {os.path.basename(p) for p in recorder.checkpoints}
    assert announced == {"ep01.weights.h5", "ep02.weights.h5"}
    assert os.listdir(tmp_path / "ckpt") == ["ep02.weights.h5"]  # ep01 was rotated away locally
    assert [os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "ep02.weights.h5"
    ]
    # The final model, an MLflow Model of the run (its LoggedModel), loadable and equal to the trained one.
    import mlflow

    (output,) = run.outputs.model_outputs
    local = mlflow.artifacts.download_artifacts(
        client.get_logged_model(output.model_id).artifact_location + "/data/model.keras",
        dst_path=str(tmp_path / "download"),
        tracking_uri=server.uri,
    )
    restored = keras.models.load_model(local)
    for a, b in zip(restored.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)

    assert not list((tmp_path / "mlflow").iterdir())  # no spool, no file left waiting for upload
    assert {name: os.environ.get(name) for name in HTTP_ENV} == env_before  # nothing left behind


class Outage:
    """Stops the server at one step and restarts it (in the background) at a later one; times
    every train call made while the server is down."""

    def __init__(self, server, stop_at, restart_at):
        self.server, self.stop_at, self.restart_at = server, stop_at, restart_at
        self.down_intervals, self.last, self.thread = [], None, None

    @hookimpl
    def on_train_batch_end(self, trainer):
        now = time.perf_counter()
        step = trainer.global_step
        if self.last is not None and step > self.stop_at and not self.server.running:
            self.down_intervals.append(now - self.last)
        elif self.last is not None and step > self.stop_at and self.thread.is_alive():
            self.down_intervals.append(now - self.last)  # restarting: not answering yet
        if step == self.stop_at:
            self.server.stop()
        if step == self.restart_at:
            self.thread = threading.Thread(target=self.server.start)
            self.thread.start()
        self.last = time.perf_counter()  # the stop itself is the test's doing, not a stall


def test_mlflows_client_works_on_the_sinks_thread_never_the_training_thread(server, tmp_path, monkeypatch):
    from corebus.integrations.mlflow import _Writer

    threads = set()
    send = _Writer._send

    def spy(self, records):
        threads.add(threading.current_thread().name)
        return send(self, records)

    monkeypatch.setattr(_Writer, "_send", spy)
    x, y = tiny_data(96)  # 12 steps per epoch
    mlflow_logger = logger(server, tmp_path, log_every_n_steps=1)
    make_trainer([mlflow_logger]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    client = server.client()
    assert client.get_run(mlflow_logger.run_id).info.status == "FINISHED"
    assert steps_of(client, mlflow_logger.run_id, "loss") == list(range(1, 25))
    assert threads == {f"corebus-sink-mlflow-{mlflow_logger.state_dict()['run_key'][:8]}"}


def test_an_isolated_client_writes_from_a_child_process_with_the_same_results(server, tmp_path, monkeypatch):
    """``isolate_sdk=True`` moves MLflow's client into a child process (off the training
    process's interpreter lock); the default does so only for a local store logging every step,
    where bench_loggers measured it worth it."""
    from corebus.integrations.mlflow import _Writer

    def not_here(self, records):
        raise AssertionError("MLflow's client ran in the training process")

    monkeypatch.setattr(_Writer, "_send", not_here)
    x, y = tiny_data(96)
    mlflow_logger = logger(server, tmp_path, log_every_n_steps=1, isolate_sdk=True)
    make_trainer([mlflow_logger]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    client = server.client()
    assert client.get_run(mlflow_logger.run_id).info.status == "FINISHED"
    assert steps_of(client, mlflow_logger.run_id, "loss") == list(range(1, 25))
    local = f"sqlite:///{tmp_path}/mlflow.db"
    assert MLflowLogger(tracking_uri=local, dir=tmp_path, log_every_n_steps=1).isolate_sdk
    assert not MLflowLogger(tracking_uri=local, dir=tmp_path, log_every_n_steps=10).isolate_sdk
    assert not MLflowLogger(tracking_uri=server.uri, dir=tmp_path, log_every_n_steps=1).isolate_sdk


def test_a_dead_server_never_stalls_training_and_every_metric_lands_once(server, tmp_path):
    x, y = tiny_data(640)  # 80 steps per epoch
    outage = Outage(server, stop_at=10, restart_at=40)
    mlflow_logger = logger(server, tmp_path, log_every_n_steps=1, shutdown_timeout=60)
    try:
        make_trainer([outage, mlflow_logger]).fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
    finally:
        outage.thread.join()
    stats = mlflow_logger.sink.stats
    assert stats["failures"] >= 1 and stats["spooled"] > 0, stats  # the outage was really hit
    assert len(outage.down_intervals) > 100
    # A step that waited on the dead server would take the HTTP timeout (10 s) or MLflow's own
    # retries (minutes); 2 s leaves room for a loaded machine (the restart itself costs CPU).
    assert max(outage.down_intervals) < 2.0, max(outage.down_intervals)

    client = server.client()
    run_id = mlflow_logger.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps_of(client, run_id, "loss") == list(range(1, 241))  # each step once, none lost
    assert steps_of(client, run_id, "accuracy") == list(range(1, 241))
    assert steps_of(client, run_id, "epoch/loss") == [80, 160, 240]
    assert not list((tmp_path / "mlflow").glob("*.spool.jsonl"))


@pytest.mark.parametrize(
    "error, status",
    [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (SystemExit(128 + 15), "KILLED")],
)  # a stop turned into an exit
def test_a_crash_marks_the_run_failed_and_an_interrupt_killed(server, tmp_path, error, status):
    x, y = tiny_data(96)
    mlflow_logger = logger(server, tmp_path, log_every_n_steps=1)
    with pytest.raises(PluginError if status == "FAILED" else type(error)):
        make_trainer([mlflow_logger, FailAt(5, error)]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    client = server.client()
    assert client.get_run(mlflow_logger.run_id).info.status == status
    # Batch records follow on_train_batch_end, where step 5 raised: steps 1-4 were logged, all of
    # them (the records held reached the logger before on_exception closed the run).
    assert steps_of(client, mlflow_logger.run_id, "loss") == [1, 2, 3, 4]


def test_in_model_fit_a_crashed_run_is_closed_by_the_next_fit(server, tmp_path):
    x, y = tiny_data(96)
    mlflow_logger, fail = logger(server, tmp_path, log_every_n_steps=1), FailAt(5, RuntimeError("boom"))
    model = tiny_model()
    callback = KerasCallback([mlflow_logger, fail])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(PluginError):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    deadline = time.monotonic() + 10
    while mlflow_logger.run_id is None and time.monotonic() < deadline:
        time.sleep(0.05)
    crashed = mlflow_logger.run_id
    client = server.client()
    assert client.get_run(crashed).info.status == "RUNNING"  # Keras has no hook to tell us
    fail.step = 10**9
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert client.get_run(crashed).info.status == "FAILED"
    # the records of the steps trained before the crash, held for the logger, were not lost
    assert steps_of(client, crashed, "loss") == [1, 2, 3, 4]
    assert mlflow_logger.run_id != crashed and client.get_run(mlflow_logger.run_id).info.status == "FINISHED"


def test_a_resumed_run_continues_the_same_mlflow_run_without_repeating_steps(server, tmp_path):
    x, y = tiny_data(96)  # 12 steps per epoch
    backup_dir = tmp_path / "backup"
    first = logger(server, tmp_path, log_every_n_steps=1)
    with pytest.raises(PluginError):  # snapshots every 5 steps; dies at 18, so resumes at 15
        make_trainer([BackupAndRestore(str(backup_dir), save_freq=5), first, FailAt(18, RuntimeError("crash"))]).fit(
            x, y, batch_size=8, epochs=3, verbose=0, shuffle=False
        )
    client = server.client()
    assert client.get_run(first.run_id).info.status == "FAILED"
    assert steps_of(client, first.run_id, "loss") == list(range(1, 18))

    second, recorder = logger(server, tmp_path, log_every_n_steps=1), Recorder()
    make_trainer([BackupAndRestore(str(backup_dir), save_freq=5), second, recorder]).fit(
        x, y, batch_size=8, epochs=3, verbose=0, shuffle=False
    )
    assert recorder.steps[0] == 16  # it really resumed mid-epoch, and re-ran steps 16 and 17
    run = client.get_run(second.run_id)
    assert second.run_id == first.run_id and run.info.status == "FINISHED"
    assert run.data.tags["corebus.resumed_at_step"] == "15"
    assert steps_of(client, run.info.run_id, "loss") == list(range(1, 37))  # 16, 17 not twice
    assert steps_of(client, run.info.run_id, "epoch/loss") == [12, 24, 36]
    after = dict(history(client, run.info.run_id, "loss"))
    assert all(after[s] == pytest.approx(recorder.logs[s]["loss"], rel=1e-12) for s in range(18, 37))


def test_records_left_by_a_dead_server_arrive_with_corebus_sync(server, tmp_path):
    x, y = tiny_data(96)

    class StopServer:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 5:
                server.stop()

    mlflow_logger = logger(server, tmp_path, log_every_n_steps=1, shutdown_timeout=1)
    try:
        make_trainer([StopServer(), mlflow_logger]).fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        spools = list((tmp_path / "mlflow").glob("*.spool.jsonl"))
        assert len(spools) == 1
    finally:
        server.start()
    result = subprocess.run(
        [sys.executable, "-m", "corebus", "sync", str(tmp_path / "mlflow")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "replayed" in result.stdout and not spools[0].exists()
    client = server.client()
    run = run_of(client, mlflow_logger)
    assert steps_of(client, run.info.run_id, "loss") == list(range(1, 25))
    assert steps_of(client, run.info.run_id, "epoch/loss") == [12, 24]
    assert run.info.status == "FINISHED"


def test_missing_mlflow_names_the_extra_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MissingExtraError, match=r'pip install "corebus\[mlflow\]"'):
        MLflowLogger(dir=tmp_path)
    with pytest.raises(MissingExtraError, match=r'pip install "corebus\[mlflow\]"'):
        corebus.Trainer(
            tiny_model(), "sgd", "sparse_categorical_crossentropy", plugins=[{"name": "mlflow", "dir": str(tmp_path)}]
        )


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="log_every_n_steps"):
        MLflowLogger(log_every_n_steps=0, dir=tmp_path)
    with pytest.raises(ConfigError, match="shutdown_timeout"):
        MLflowLogger(shutdown_timeout=-1, dir=tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="cannot write"):
        MLflowLogger(dir=tmp_path / "a-file")


def test_alerts_are_recorded_on_the_run_even_from_another_thread(server, tmp_path):
    x, y = tiny_data(96)

    class Alerting:
        @hookimpl
        def on_epoch_end(self, trainer, epoch):
            if epoch == 0:
                trainer.alert("plateau", "val_loss stuck", "no improvement for 3 epochs", "warning")

        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 3:  # as a watchdog does: from a thread of its own
                worker = threading.Thread(target=trainer.alert, args=("stall", "no step for 60 s", "stack...", "error"))
                worker.start()
                worker.join()

    mlflow_logger = logger(server, tmp_path)
    fit("engine", [mlflow_logger, Alerting()], x, y, epochs=2)
    tags = server.client().get_run(mlflow_logger.run_id).data.tags
    assert tags["corebus.alert.stall"] == "step 3: [error] no step for 60 s\nstack..."
    assert tags["corebus.alert.plateau"].startswith("step 12: [warning] val_loss stuck")
    assert tags["corebus.alerts"].splitlines() == [
        "step 3: [error] no step for 60 s",
        "step 12: [warning] val_loss stuck",
    ]


def test_a_local_store_crash_and_resume_continue_one_run_and_keep_artifacts_beside_the_store(tmp_path, monkeypatch):
    """MLflow's default kind of store (sqlite, no server), written by MLflow's client on the
    sink's thread: a crash ends FAILED, a resume continues the same run without repeating
    steps, and the artifacts land beside the store, not in ``./mlruns`` of the working
    directory (MLflow's own default)."""
    from mlflow.tracking import MlflowClient

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "store"
    uri = f"sqlite:///{store}/mlflow.db"
    store.mkdir()
    x, y = tiny_data(96)  # 12 steps per epoch
    backup_dir = tmp_path / "backup"

    def local_logger():
        return MLflowLogger(
            tracking_uri=uri,
            experiment_name="corebus-tests",
            dir=tmp_path / "mlflow",
            log_every_n_steps=1,
            shutdown_timeout=120,
            log_model=True,
        )

    first = local_logger()
    with pytest.raises(PluginError):
        make_trainer([BackupAndRestore(str(backup_dir), save_freq=5), first, FailAt(18, RuntimeError("crash"))]).fit(
            x, y, batch_size=8, epochs=3, verbose=0, shuffle=False
        )
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first.run_id).info.status == "FAILED"
    assert steps_of(client, first.run_id, "loss") == list(range(1, 18))

    second, recorder = local_logger(), Recorder()
    make_trainer([BackupAndRestore(str(backup_dir), save_freq=5), second, recorder]).fit(
        x, y, batch_size=8, epochs=3, verbose=0, shuffle=False
    )
    run = client.get_run(second.run_id)
    assert second.run_id == first.run_id and run.info.status == "FINISHED"
    assert steps_of(client, run.info.run_id, "loss") == list(range(1, 37))
    assert run.data.params["fit.epochs"] == "3"
    assert not list((tmp_path / "mlflow").glob("*.spool.jsonl"))  # everything delivered
    # the final model is an MLflow Model of the run (one LoggedModel), stored beside the store
    (output,) = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).artifact_location.startswith((store / "mlartifacts").as_uri())
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert list(store.glob("mlartifacts/corebus-tests/models/*/artifacts/data/model.keras"))
    assert not list(elsewhere.iterdir())  # nothing in the working directory (no ./mlruns)


def test_an_artifact_location_is_used_when_the_experiment_is_created(tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    x, y = tiny_data(32)
    mlflow_logger = MLflowLogger(
        tracking_uri=uri,
        experiment_name="placed",
        dir=tmp_path / "mlflow",
        artifact_location="elsewhere/artifacts",
        log_model=True,
        shutdown_timeout=120,  # logging the model (MLflow infers its requirements) is slow on a busy machine
    )
    make_trainer([mlflow_logger]).fit(x, y, batch_size=8, epochs=1, verbose=0)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("placed").artifact_location == (tmp_path / "elsewhere/artifacts").as_uri()
    assert list((tmp_path / "elsewhere/artifacts").glob("models/*/artifacts/data/model.keras"))
    with pytest.raises(ConfigError, match="artifact_location"):
        MLflowLogger(tracking_uri=uri, dir=tmp_path / "mlflow", artifact_location="")
    # MLflow fixes the location when an experiment is created: an existing one keeps its own, with a word
    again = MLflowLogger(
        tracking_uri=uri, experiment_name="placed", dir=tmp_path / "mlflow", artifact_location=str(tmp_path / "other")
    )
    with caplog.at_level("WARNING", logger="corebus"):
        make_trainer([again]).fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "already exists and keeps its artifact location" in caplog.text


def test_more_points_than_one_request_holds_arrive_through_mlflows_client(server):
    """Metrics go through ``MlflowClient.log_batch``, which splits them into MLflow's limit of
    1000 per request: 2,420 points, non-finite and extreme values included, land as sent."""
    from mlflow.entities import Metric

    from corebus.integrations.mlflow import _Writer

    values = [
        0.5,
        float("nan"),
        float("inf"),
        float("-inf"),
        1e-30,
        -0.0,
        5e-324,
        1.7976931348623157e308,
        0.1 + 0.2,
        -123456789.123456789,
    ] + [float(i) for i in range(1200)]
    points = [[step, 1000 + step, {"m": value, "val/loss": -value}] for step, value in enumerate(values)]
    writer = _Writer(server.uri, "corebus-tests", None)
    writer.send(
        [
            {"type": "start", "run": "many-points", "ts": 1000},
            {"type": "metrics", "run": "many-points", "points": points},
        ]
    )
    client = server.client()
    ours = writer.run_ids["many-points"]
    theirs = client.create_run(client.get_run(ours).info.experiment_id).info.run_id
    client.log_batch(
        theirs,
        metrics=[Metric(k, v, ts, step) for step, ts, values in points for k, v in values.items()],
        synchronous=True,
    )
    # as MLflow stores them (a store keeps infinities as the largest double)
    got, expected = (
        sorted(
            (key, m.step, m.timestamp, repr(m.value))
            for key in ("m", "val/loss")
            for m in client.get_metric_history(run, key)
        )
        for run in (ours, theirs)
    )
    assert got == expected and len(got) == 2 * len(values)


class LossBuffer:
    """A third-party plugin without get_config: a constructor parameter and running state."""

    def __init__(self, every=3):
        self.every = every
        self.losses = []
        self.wait = 0

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.wait += 1
        self.losses.append(trainer.global_step)


def summary_counts(model):
    """Keras's own parameter counts, read from ``model.summary()``."""
    import re

    lines = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(lines))
    return {
        kind: re.search(rf"{kind} params: ([\d,]+)", text).group(1).replace(",", "")
        for kind in ("Total", "Trainable", "Non-trainable")
    }


@pytest.mark.parametrize("mode", ["engine", "keras"])
def test_params_are_configuration_with_loss_metrics_optimizer_and_model_size(tmp_path, mode):
    from mlflow.tracking import MlflowClient

    from corebus.plugins import EarlyStopping

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    x, y = tiny_data(64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    mlflow_logger = MLflowLogger(tracking_uri=uri, experiment_name="params", dir=tmp_path / "mlflow")
    plugins = [EarlyStopping(monitor="loss", patience=5), LossBuffer(), mlflow_logger]
    if mode == "engine":
        make_trainer(plugins, model=model, optimizer="adam").fit(x, y, batch_size=8, epochs=2, verbose=0)
    else:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[KerasCallback(plugins)])
    params = MlflowClient(tracking_uri=uri).get_run(mlflow_logger.run_id).data.params
    assert params["model.loss"] == "sparse_categorical_crossentropy"
    assert params["model.metrics"] == '["accuracy"]'
    assert params["optimizer.default.name"] == model.optimizer.name  # Keras names it ("adam", "adam_1"...)
    counts = summary_counts(model)  # Keras's "Total" there adds the optimizer's variables
    assert (params["model.trainable_params"], params["model.non_trainable_params"]) == (
        counts["Trainable"],
        counts["Non-trainable"],
    )
    assert params["model.total_params"] == str(model.count_params())
    assert params["model.non_trainable_params"] == "16"  # BatchNormalization's moving mean and variance
    # configuration, not running state (patience counters, best values, buffers)
    assert params["plugins.EarlyStopping.patience"] == "5" and params["plugins.EarlyStopping.monitor"] == "loss"
    assert params["plugins.LossBuffer.every"] == "3"
    for state in (
        "plugins.EarlyStopping.wait",
        "plugins.EarlyStopping.best",
        "plugins.EarlyStopping.stopped_epoch",
        "plugins.LossBuffer.losses",
        "plugins.LossBuffer.wait",
    ):
        assert state not in params, state


@pytest.mark.parametrize(
    "log_checkpoints, expected",
    [("kept", ["ep03.weights.h5"]), ("all", ["ep01.weights.h5", "ep02.weights.h5", "ep03.weights.h5"]), (False, [])],
)
def test_uploaded_checkpoints_follow_the_checkpoint_plugins_keep_policy(tmp_path, log_checkpoints, expected):
    """save_top_k=1 on a falling training loss keeps one file on disk: "kept" (the default)
    leaves the run with that one; "all" keeps every upload; False uploads none."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    x, y = tiny_data(64)
    checkpoint = ModelCheckpoint(
        str(tmp_path / "ckpt" / "ep{epoch:02d}.weights.h5"), save_weights_only=True, monitor="loss", save_top_k=1
    )
    mlflow_logger = MLflowLogger(
        tracking_uri=uri, experiment_name="ckpt", dir=tmp_path / "mlflow", log_checkpoints=log_checkpoints
    )
    make_trainer([mlflow_logger, checkpoint], optimizer="adam").fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert os.listdir(tmp_path / "ckpt") == ["ep03.weights.h5"]
    listed = MlflowClient(tracking_uri=uri).list_artifacts(mlflow_logger.run_id, "checkpoints")
    assert sorted(os.path.basename(a.path) for a in listed) == expected
    with pytest.raises(ConfigError, match="log_checkpoints"):
        MLflowLogger(tracking_uri=uri, dir=tmp_path / "mlflow", log_checkpoints="best")


def test_a_password_in_the_tracking_uri_is_never_printed_logged_or_spooled(server, tmp_path, capfd, caplog):
    """A canary password in ``http://user:PASS@host``: a run to the live server (MLflow's own
    "View run at" line would print it) and one to a dead port (send failures, spool), then
    every byte of console output, log records, params and spool files is searched."""
    import logging
    from urllib.parse import urlsplit

    from mlflow_server import free_port

    canary = "Canary-Pa55word-7c1f"
    caplog.set_level(logging.INFO)
    x, y = tiny_data(32)
    port = urlsplit(server.uri).port
    live = logger(server, tmp_path, log_every_n_steps=1)
    live.tracking_uri = live._writer.tracking_uri = f"http://ada:{canary}@127.0.0.1:{port}"
    make_trainer([live]).fit(x, y, batch_size=8, epochs=1, verbose=0)
    run = server.client().get_run(live.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["plugins.MLflowLogger.tracking_uri"] == f"http://ada:***@127.0.0.1:{port}"
    assert not any(canary in value for value in {**run.data.params, **run.data.tags}.values())

    dead = MLflowLogger(
        tracking_uri=f"http://ada:{canary}@127.0.0.1:{free_port()}",
        experiment_name="corebus-tests",
        dir=tmp_path / "dead",
        log_every_n_steps=1,
        shutdown_timeout=1,
    )
    make_trainer([dead]).fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "send failed" in caplog.text  # the failure path really ran
    spooled = list((tmp_path / "dead").rglob("*"))
    assert any(p.name.endswith(".spool.jsonl") for p in spooled)
    out, err = capfd.readouterr()
    for where, text in [("stdout", out), ("stderr", err), ("log", caplog.text)] + [
        (str(p), p.read_bytes().decode(errors="replace")) for p in spooled if p.is_file()
    ]:
        assert canary not in text, where
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ  # restored after the run
