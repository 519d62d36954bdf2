"""Log a run to MLflow: params, metrics, checkpoints, the final model and an honest status.

Everything goes through :class:`corebus.LogSink`: hooks only enqueue records, one worker thread
turns them into ``MlflowClient`` calls, and records that could not be delivered wait in a spool
under ``dir`` (``corebus sync <dir>`` replays them later). Nothing global of MLflow is touched
(no fluent ``mlflow.start_run``), so several loggers and the user's own MLflow code coexist.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from corebus import Cadence, ConfigError, hookimpl
from corebus.kit import (
    BackendProcess,
    InProcessBackend,
    LoggerOutbox,
    LogSink,
    OutboxTarget,
    check_number,
    check_writable,
    read_spool,
    redact,
    require_module,
    run_status,
    scalar_values,
    step_points,
)

from .mlflow_model import ModelRecorder, check_model_options
from .mlflow_writer import (
    MAX_TAG,
    _Writer,
    clean_key,
    flatten,
    is_server,
    local_artifact_location,
    mlflow_env,
    redact_uri_secrets,
    run_params,
    safe_uri,
)

log = logging.getLogger("corebus")

__all__ = ["MLflowLogger"]
LOG_CHECKPOINTS = ("kept", "all", False)


class MLflowLogger:
    """Log params, metrics, checkpoints and the final model of a ``fit`` to an MLflow run.

    :param tracking_uri: where to log; default ``mlflow.get_tracking_uri()`` (the
        ``MLFLOW_TRACKING_URI`` variable, else MLflow's own default, ``sqlite:///mlflow.db`` in
        the working directory). Pass ``"sqlite:///<run-dir>/mlflow.db"`` to keep a run's store
        beside its files, or ``"http://host:5000"`` for a tracking server.
    :param experiment_name: default ``MLFLOW_EXPERIMENT_NAME``, else ``"corebus"`` (created
        when missing).
    :param run_name: the MLflow run name (MLflow picks one when ``None``).
    :param log_every_n_steps: log batch metrics each time the global step crosses a multiple
        of N (exact under ``steps_per_execution``); ``None`` logs epoch metrics only.
    :param dir: where the spool and the files waiting for upload live.
    :param log_model: an MLflow Model of the run (Keras flavor, signature and input example from
        the training rows), as ``mlflow.keras.autolog`` logs: ``True`` / ``"last"`` the final
        weights, ``"best"`` the checkpoint plugin's best file's (docs/logging.md, "MLflow").
    :param registered_model_name: register it as a new Model Registry version (tags ``run_id``,
        ``weights``, ``monitor``, ``best_value``, ``best_epoch``).
    :param system_metrics: MLflow's own ``SystemMetricsMonitor`` on the run: ``True`` (every
        10 s), seconds, or ``False``; default ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``.
    :param log_datasets: the training / validation inputs as ``mlflow.data`` run inputs
        (``Trainer.fit`` only: inside ``model.fit`` Keras shows callbacks no data).
    :param log_checkpoints: ``"kept"`` (default): upload every checkpoint announced by
        ``on_checkpoint_saved`` and remove from the run the ones the checkpoint plugin deleted
        since (its ``save_top_k``), so the run holds what the disk holds; ``"all"``: upload
        every one and keep it; ``False``: upload none.
    :param artifact_location: where the experiment keeps its artifacts, used when this logger
        creates the experiment. Default: beside a sqlite store (``<store dir>/mlartifacts/
        <experiment>``), never ``./mlruns`` of the working directory; a file store keeps them
        inside itself and a tracking server decides on its side.
    :param shutdown_timeout: seconds ``fit`` waits at the end for delivery; the rest stays
        in the spool.
    :param tags: run tags.
    :param isolate_sdk: run MLflow's client in a child process (:class:`corebus.BackendProcess`,
        at lower CPU priority) instead of on the sink's thread. Default: yes for a local store
        (sqlite, files) with batch metrics every step, no otherwise. A local store's client does
        the storage work itself in Python (~0.4 ms of CPU per point in SQLAlchemy) and holds the
        interpreter lock the training loop needs: with TensorBoard + MLflow + W&B logging every
        step (``benchmarks/bench_loggers.py --every 1 --isolation``) the child gave 1.12-1.24x
        the steps/s in each of 3 pairs; every 10 steps it gave no steady gain (0.73-2.27x) and
        costs a second interpreter (2-3 s of CPU to import MLflow again). ``log_model`` is
        still logged in this process (the child would import TensorFlow for it).

    Naming: batch metrics under their Keras names (``loss``) at the global optimizer step (the
    learning rate per epoch only: MLflow stores every point); epoch metrics as
    ``epoch/<name>`` (``epoch/val_loss``, ``epoch/learning_rate``...) at the global step the
    epoch ended on, beside an ``epoch`` metric (0-based index) so a chart can use either axis.

    Params are configuration only: ``trainer.run_params()`` flattened with dots
    (``fit.epochs``, ``optimizer.default.learning_rate``, ``optimizer.default.name``,
    ``plugins.<name>.<param>``: a plugin's ``get_config()``, else the attributes named like its
    constructor's parameters, never its running state), plus ``model.loss``,
    ``model.metrics`` and the model's ``model.total_params`` / ``model.trainable_params`` /
    ``model.non_trainable_params`` (what ``mlflow.tensorflow.autolog`` records in its model
    summary); secrets redacted, values cut to 6000 characters.

    Checkpoints go to ``checkpoints/`` as they are announced; the file is hard-linked first, so
    a checkpoint rotated away before the upload still arrives. Metric points are handed to the
    sink every ``corebus.LOGGER_FLUSH_SECONDS`` (2 s), so a dashboard trails training by up to
    a few seconds. Everything is sent with ``MlflowClient`` (``log_batch``, which splits into
    MLflow's per-request limits) on the sink's worker thread (or in its child, ``isolate_sdk``):
    every backend MLflow supports works.

    Alerts (``on_alert``, e.g. from ``stall_alert``) become run tags: ``corebus.alert.<kind>``
    holds the latest of each kind with its text, ``corebus.alerts`` one line per alert.

    Status: FINISHED at the end of ``fit``; FAILED when it raises; KILLED when it is stopped
    (``KeyboardInterrupt``, ``SystemExit``). Inside ``model.fit`` Keras has no exception hook,
    so the status is set at ``on_train_end`` only: a crash there leaves the run RUNNING until
    the same logger's next ``fit`` marks it FAILED. A run restored from a snapshot
    (``state_dict`` holds the run) continues the same MLflow run; steps the interrupted
    process had already logged are not logged twice. Each metric lands once per (key, step)
    after an outage too: the points of a failed request are checked against the run's history
    before they are sent again.

    For an ``http(s)`` tracking URI, while a run is open this sets
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=10`` and
    ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=0`` unless you set them yourself (MLflow reads them per
    request and has no per-client setting; the sink retries instead), and removes them at the
    end. A password in the URI (``http://user:PASS@host``) is shown as ``***`` in params,
    warnings and the spool, and MLflow's own "View run at" line (which would print it) is
    suppressed with ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``; ``corebus sync`` then needs
    ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``. Only the chief logs under ``tf.distribute``.
    """

    runs_on = "chief"  # under tf.distribute: one writer, not one per worker

    # A failing logger never stops training: one warning, then off after 5 failures in a row.
    error_policy = "disable"
    max_failures = 5

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        log_every_n_steps: int | None = 10,
        dir: str | os.PathLike = "corebus-runs/mlflow",
        log_model: bool = False,
        shutdown_timeout: float = 30.0,
        tags: dict[str, Any] | None = None,
        isolate_sdk: bool | None = None,
        log_checkpoints: str | bool = "kept",
        artifact_location: str | None = None,
        registered_model_name: str | None = None,
        system_metrics: bool | float | None = None,
        log_datasets: bool = False,
    ):
        mlflow = require_module("mlflow", extra="mlflow", what="MLflowLogger")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ConfigError(
                f"MLflowLogger: log_every_n_steps={log_every_n_steps!r}; use a positive integer, "
                "or None for epoch metrics only"
            )
        check_number("MLflowLogger", "shutdown_timeout", shutdown_timeout, at_least=0, unit="seconds")
        if log_checkpoints is not False and (
            not isinstance(log_checkpoints, str) or log_checkpoints not in LOG_CHECKPOINTS
        ):
            raise ConfigError(
                f'MLflowLogger: log_checkpoints={log_checkpoints!r}; use "kept" (the files the '
                'checkpoint plugin keeps), "all" or False'
            )
        if artifact_location is not None and (
            not isinstance(artifact_location, (str, os.PathLike)) or not os.fspath(artifact_location)
        ):
            raise ConfigError(
                f"MLflowLogger: artifact_location={artifact_location!r}; use a path or URI "
                "(e.g. 's3://bucket/corebus'), or None"
            )
        self.tracking_uri = str(tracking_uri or mlflow.get_tracking_uri())
        if self.tracking_uri.startswith("sqlite:///") and not self.tracking_uri[10:].startswith("/"):
            # absolute, so `corebus sync` run from another directory finds the same database
            self.tracking_uri = "sqlite:///" + os.path.abspath(self.tracking_uri[10:])
        self.experiment_name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "corebus"
        self.run_name = run_name
        self.log_every_n_steps = log_every_n_steps
        self.dir = os.path.abspath(os.fspath(dir))
        check_writable(self.dir, "MLflowLogger")
        system_metrics = check_model_options(log_model, registered_model_name, system_metrics)
        self.log_model = "last" if log_model is True else log_model
        self.registered_model_name = registered_model_name
        self.system_metrics = system_metrics
        self.log_datasets = bool(log_datasets)
        self.log_checkpoints = log_checkpoints
        self.artifact_location = (
            _absolute_location(os.fspath(artifact_location))
            if artifact_location is not None
            else local_artifact_location(self.tracking_uri, self.experiment_name)
        )
        self.shutdown_timeout = float(shutdown_timeout)
        # a tag may carry a ${VAR} secret or a credential URL: tags are shown to everyone
        self.tags = {clean_key(k): redact(str(v))[:MAX_TAG] for k, v in (tags or {}).items()}
        self._outbox = LoggerOutbox(
            "mlflow", self._open_run, owner="MLflowLogger", shutdown_timeout=self.shutdown_timeout
        )
        self.batch_log_cadence = Cadence.every_n(log_every_n_steps) if log_every_n_steps else None
        self._writer = _Writer(
            self.tracking_uri, self.experiment_name, run_name, artifact_location=self.artifact_location
        )
        self.isolate_sdk = (
            (not is_server(self.tracking_uri) and log_every_n_steps == 1) if isolate_sdk is None else bool(isolate_sdk)
        )
        self._backend: BackendProcess | InProcessBackend | None = None  # where self._writer's sends run
        self._key: str | None = None
        self._restored = False
        self._phase = "idle"  # -> "begun" (on_train_begin) -> "open" (sink running) -> "idle"
        self._params: dict[str, Any] = {}
        self._names: dict[str, str] = {}
        self._uploaded: set[str] = set()  # checkpoint files uploaded and not yet seen deleted ("kept")
        self._model = ModelRecorder()  # training rows, datasets, the best checkpoint (log_model, log_datasets)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the worker created (or found) the run."""
        return self._writer.run_ids.get(self._key) if self._key else None

    @property
    def sink(self) -> LogSink | None:
        """The sink of the last run opened (kept after the run for its ``stats``)."""
        return self._outbox.sink

    def get_config(self) -> dict[str, Any]:
        return {
            "tracking_uri": safe_uri(self.tracking_uri),
            "experiment_name": self.experiment_name,
            "run_name": self.run_name,
            "log_every_n_steps": self.log_every_n_steps,
            "dir": self.dir,
            "log_model": self.log_model,
            "log_checkpoints": self.log_checkpoints,
            "registered_model_name": self.registered_model_name,
            "system_metrics": self.system_metrics,
            "log_datasets": self.log_datasets,
            "artifact_location": self.artifact_location and safe_uri(self.artifact_location),
            "shutdown_timeout": self.shutdown_timeout,
            "tags": self.tags,
            "isolate_sdk": self.isolate_sdk,
        }

    # ---------------------------------------------------------------- hooks (training thread)

    @hookimpl
    def on_train_begin(self, trainer):
        if self._phase == "open":  # the last model.fit raised: Keras told no callback
            log.warning("MLflowLogger: the previous fit ended without on_train_end; marking run %s FAILED", self.run_id)
            self._finish("FAILED")
        if not self._restored:
            self._key = uuid.uuid4().hex
            self._uploaded = set()
        self._params = run_params(trainer)
        self._model.begin(trainer, self.log_model, self.log_datasets)
        # The run is opened at the first event, not here: a snapshot restored later in
        # on_train_begin (BackupAndRestore) may still hand us the interrupted run to continue.
        self._phase = "begun"

    @hookimpl
    def on_state_restored(self, step):
        if self._ready():
            self._put("tags", tags={"corebus.resumed_at_step": str(step)})

    @hookimpl
    def on_log_steps(self, records):
        if self.batch_log_cadence is None or (self._phase != "open" and not self._ready()):
            return
        # The engine hands the records over every LOGGER_FLUSH_SECONDS: one sink record (one
        # request) for all of them; an MLflow request costs far more than its payload does.
        points = [
            [step, int(at * 1000), self._metrics(values)]
            for step, at, values in step_points(records, self.batch_log_cadence)
        ]
        if points:
            self._put("metrics", points=points)

    @hookimpl
    def on_log(self, trainer, step, logs):  # epoch records (batch records come to on_log_steps)
        if self._phase != "open" and not self._ready():
            return
        values = {f"epoch/{name}": value for name, value in logs.items()}
        values["epoch"] = trainer.epoch
        # Consecutive metrics records go out in one log_batch (the writer joins them).
        self._put("metrics", points=[[int(step), _now_ms(), self._metrics(scalar_values(values))]])

    @hookimpl
    def on_alert(self, alert):
        # May come from a watchdog thread while the training thread logs: the outbox is thread-safe.
        record = {
            "type": "alert",
            "run": self._key,
            "kind": alert.kind,
            "level": alert.level,
            "title": alert.title,
            "text": alert.text,
            "step": alert.step,
            "time": alert.time,
        }
        if self._phase == "open":
            self._outbox.put(record)
        elif self._phase == "begun":  # before the first step (a hung compilation): sent on open, to its run
            self._outbox.hold(record)

    @hookimpl
    def on_checkpoint_saved(self, trainer, filepath, metadata):
        if not self._ready():
            return
        if self.log_model == "best":
            self._model.track_best(trainer, filepath, metadata or {}, self._outbox.stage)
        if self.log_checkpoints is False:
            return
        self._forget_deleted()
        self._put("artifact", path=str(self._outbox.stage(filepath)), artifact_path="checkpoints")
        if self.log_checkpoints == "kept":
            self._uploaded.add(os.path.abspath(filepath))

    # trylast: other plugins' on_train_end / on_exception may still announce a checkpoint
    # (background writes are announced when they finish), delete one or log; the run closes after them.
    @hookimpl(trylast=True)
    def on_train_end(self, trainer):
        if not self._ready():
            return
        if self.log_model:
            try:
                self._put(
                    "model",
                    **self._model.record(trainer, self._outbox.stage, self.log_model, self.registered_model_name),
                )
            except Exception as exc:  # e.g. a subclassed model Keras cannot serialise
                log.warning("MLflowLogger: could not save the final model (%s: %s)", type(exc).__name__, exc)
        self._finish("FINISHED")

    @hookimpl(trylast=True)
    def on_exception(self, exception):
        if self._ready():
            # a stop request (Ctrl-C, a signal turned into SystemExit) is not a failure
            self._finish(run_status(exception))

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        # A snapshot counts as complete only when the points up to its step are delivered or
        # spooled: hand over what is held and wait for the sink (bounded), as TensorBoard does.
        if self._phase == "open":
            self._outbox.flush()
        return {"run_key": self._key, "run_id": self.run_id, "checkpoints": sorted(self._uploaded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._key = state.get("run_key") or uuid.uuid4().hex
        if state.get("run_id"):
            self._writer.run_ids[self._key] = state["run_id"]
        # Only looked up with os.path.exists, and only their base names are removed from this
        # run's checkpoints/ folder: a crafted list can do no more than that.
        self._uploaded = {p for p in state.get("checkpoints") or () if isinstance(p, str)}
        self._restored = True

    # ---------------------------------------------------------------- helpers

    def _ready(self) -> bool:
        """Open the run on the first event after on_train_begin; False when no run is going."""
        if self._phase == "begun":
            self._outbox.open()
        return self._phase == "open"

    def _open_run(self) -> OutboxTarget:
        """The outbox's opener: the writer's backend (a child process or here) and the run's
        first records; the spool is ``<dir>/mlflow-<run key>.spool.jsonl``."""
        resumed, self._restored = self._restored, False
        self._key = self._key or uuid.uuid4().hex
        self._backend = (
            BackendProcess(
                _Writer,
                self.tracking_uri,
                self.experiment_name,
                self.run_name,
                artifact_location=self.artifact_location,
            )
            if self.isolate_sdk
            else InProcessBackend(self._writer)
        )
        mlflow_env(self.tracking_uri, +1)
        self._phase = "open"
        first = [
            {
                "type": "start",
                "ts": _now_ms(),
                "run_name": self.run_name,
                "tags": self.tags,
                "resumed": resumed,
                "system_metrics": self.system_metrics,
            },
            {"type": "params", "params": flatten(self._params)},
        ]
        if self._model.datasets:
            first.append({"type": "datasets", "datasets": self._model.datasets})
        for record in first:
            self._outbox.hold(record)  # every held record gets the run key at the open
        self._outbox.name = f"mlflow-{self._key[:8]}"  # names the sink's thread: several loggers may run
        header = {"plugin": "mlflow", "config": self._writer.config()}
        return OutboxTarget(
            self._send, self.dir, f"mlflow-{self._key}", header, fields={"run": self._key}, close=self._close_run
        )

    def _close_run(self) -> None:
        try:
            self._backend.close()
        finally:
            self._backend = None
            mlflow_env(self.tracking_uri, -1)

    def _send(self, records: list[dict[str, Any]]) -> None:
        """The sink's send; the run ids known here go along and come back (a child has its own)."""
        try:
            if not self.isolate_sdk:
                self._writer.run_ids.update(self._backend.call("send", records, dict(self._writer.run_ids)))
                return
            # The model is logged here: the child would import TensorFlow again (a minute at its
            # low priority on a busy machine). Order is kept; every writer lands a record once.
            segment: list[dict[str, Any]] = []
            for record in records + [None]:
                if record is not None and record["type"] != "model":
                    segment.append(record)
                    continue
                if segment:
                    self._writer.run_ids.update(self._backend.call("send", segment, dict(self._writer.run_ids)))
                    segment = []
                if record is not None:
                    self._writer.send([record])
        except Exception as exc:  # a child's errors come back as text: no password in them either
            message = redact_uri_secrets(str(exc), self.tracking_uri)
            if message == str(exc):
                raise
            raise RuntimeError(message) from None

    def _put(self, kind: str, **fields: Any) -> None:
        self._outbox.put({"type": kind, "run": self._key, **fields})

    def _metrics(self, values: dict[str, float]) -> dict[str, float]:
        out = {}
        for name, number in values.items():
            if name.startswith("learning_rate"):
                # A step's learning rate (epoch names start with "epoch/"): MLflow stores, and a
                # server charges for, every metric point, so per step it would cost as much as
                # the loss; the epoch points carry it.
                continue
            key = self._names.get(name)
            if key is None:
                key = self._names[name] = clean_key(name)
            out[key] = number
        return out

    def _forget_deleted(self) -> None:
        """Checkpoints uploaded earlier whose file the checkpoint plugin has deleted since
        (``save_top_k``) leave the run too (``log_checkpoints="kept"``)."""
        for path in sorted(self._uploaded):
            if not os.path.exists(path):
                self._uploaded.discard(path)
                name = os.path.basename(path)
                if not any(os.path.basename(p) == name for p in self._uploaded):
                    self._put("forget", artifact=f"checkpoints/{name}")

    def _finish(self, status: str) -> None:
        if self.log_checkpoints == "kept":
            self._forget_deleted()
        self._put("status", status=status, ts=_now_ms())
        self._phase = "idle"
        self._outbox.close()  # then _close_run

    @classmethod
    def replay_spool(cls, path: str | os.PathLike) -> int:
        """Deliver the records of a spool left by an earlier run (``corebus sync``); returns how
        many were delivered. Delivered records leave the spool; metrics the server already has
        (same key and step) are skipped."""
        require_module("mlflow", extra="mlflow", what="MLflowLogger")
        config = read_spool(path)[0].get("config", {})
        writer = _Writer(
            config["tracking_uri"],
            config["experiment_name"],
            config.get("run_name"),
            verify=True,
            artifact_location=config.get("artifact_location"),
        )
        mlflow_env(writer.tracking_uri, +1)
        try:
            return LoggerOutbox.replay(path, writer.send, owner="MLflowLogger")
        finally:
            mlflow_env(writer.tracking_uri, -1)


def _absolute_location(location: str) -> str:
    """A plain relative path made absolute: the experiment must not depend on the directory a
    process happened to start in."""
    if "://" in location or location.startswith(("/", "file:")):
        return location
    return Path(location).resolve().as_uri()


def _now_ms() -> int:
    return int(time.time() * 1000)
