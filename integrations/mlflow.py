"""Log a run to MLflow: params, metrics, checkpoints, the final model and an honest status.

Everything goes through :class:`corebus.LogSink`: hooks only enqueue records, one worker thread
turns them into ``MlflowClient`` calls, and records that could not be delivered wait in a spool
under ``dir`` (``corebus sync <dir>`` replays them later). Nothing global of MLflow is touched
(no fluent ``mlflow.start_run``), so several loggers and the user's own MLflow code coexist.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from corebus import (LOGGER_FLUSH_SECONDS, BackendProcess, Cadence, ConfigError, InProcessBackend, LogSink,
                     RetryLater, Spool, check_writable, hookimpl, PendingPoints, read_spool, replay_spool,
                     require_module)

log = logging.getLogger("corebus")

RUN_KEY_TAG = "corebus.run_key"  # names the run across retries, resumes and `corebus sync`
MAX_KEY, MAX_PARAM, MAX_TAG = 250, 6000, 8000  # MLflow's limits (mlflow.utils.validation)
# MLflow's HTTP client retries a dead server for ~4 minutes by default; the sink retries instead.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}


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
    :param log_model: at the end of training upload the model as ``model/model.keras``.
    :param shutdown_timeout: seconds ``fit`` waits at the end for delivery; the rest stays
        in the spool.
    :param tags: run tags.
    :param isolate_sdk: run MLflow's client in a child process. Default: yes for a local
        store, no for a tracking server (below). ``False`` keeps it in this process, on the
        sink's worker thread (where a test can patch ``mlflow``).

    Naming: batch metrics under their Keras names (``loss``) at the global optimizer step (the
    learning rate per epoch only: MLflow stores every point); epoch metrics as ``epoch/<name>`` (``epoch/val_loss``, ``epoch/learning_rate``...) at the
    global step the epoch ended on, beside an ``epoch`` metric (0-based index) so a chart can
    use either axis. Params are ``trainer.run_params()`` flattened with dots
    (``fit.epochs``, ``optimizer.default.learning_rate``, ``plugins.<name>.<param>``), secrets
    redacted, values cut to 6000 characters. Checkpoints go to ``checkpoints/`` as they are
    announced (``on_checkpoint_saved``); the file is hard-linked first, so a checkpoint rotated
    away before the upload still arrives. Metric points are handed to the sink every
    ``corebus.LOGGER_FLUSH_SECONDS`` (2 s; one MLflow request then instead of one per step), so
    a dashboard trails training by up to a few seconds.

    Alerts (``on_alert``, e.g. from ``stall_alert``) become run tags: ``corebus.alert.<kind>``
    holds the latest of each kind with its text, ``corebus.alerts`` one line per alert.

    Status: FINISHED at the end of ``fit``; FAILED when it raises; KILLED on
    ``KeyboardInterrupt``. Inside ``model.fit`` Keras has no exception hook, so the status is
    set at ``on_train_end`` only: a crash there leaves the run RUNNING until the same logger's
    next ``fit`` marks it FAILED. A run restored from a
    snapshot (``state_dict`` holds the run) continues the same MLflow run; steps the
    interrupted process had already logged are not logged twice. Each metric lands once per
    (key, step) after an outage too: records of a failed request are checked against the
    server before they are sent again.

    With a local store (sqlite, files) MLflow's client does the storage work itself, in
    SQLAlchemy, about 0.4 ms of CPU per metric point: it runs in a child process at lower CPU
    priority (:class:`corebus.BackendProcess`), never on the interpreter lock the training
    loop needs. To a tracking server it spends 6-8 ms of Python per 1,000 points (points go
    out as plain JSON, not through the client's protobuf path), on the sink's worker thread by
    default: a child measured no faster there in steady state (1.01 of the in-process rate,
    95 % interval 0.98-1.05) and its start-up takes 2-3 s of CPU to import MLflow again.

    For an ``http(s)`` tracking URI, while a run is open this sets
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=10`` and
    ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=0`` unless you set them yourself (MLflow reads them per
    request and has no per-client setting), and removes them at the end. Credentials in the URI
    are not written to params or the spool: use ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``.
    Only the chief logs under ``tf.distribute``.
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
    ):
        mlflow = require_module("mlflow", extra="mlflow", what="MLflowLogger")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ConfigError(f"MLflowLogger: log_every_n_steps={log_every_n_steps!r}; use a positive integer, "
                              "or None for epoch metrics only")
        if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0:
            raise ConfigError(f"MLflowLogger: shutdown_timeout={shutdown_timeout!r} must be a number of seconds >= 0")
        self.tracking_uri = str(tracking_uri or mlflow.get_tracking_uri())
        if self.tracking_uri.startswith("sqlite:///") and not self.tracking_uri[10:].startswith("/"):
            # absolute, so `corebus sync` run from another directory finds the same database
            self.tracking_uri = "sqlite:///" + os.path.abspath(self.tracking_uri[10:])
        self.experiment_name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "corebus"
        self.run_name = run_name
        self.log_every_n_steps = log_every_n_steps
        self.dir = os.path.abspath(os.fspath(dir))
        check_writable(self.dir, "MLflowLogger")
        self.log_model = bool(log_model)
        self.shutdown_timeout = float(shutdown_timeout)
        self.tags = {_clean_key(k): str(v)[:MAX_TAG] for k, v in (tags or {}).items()}
        self.sink: LogSink | None = None
        self.batch_log_cadence = Cadence.every_n(log_every_n_steps) if log_every_n_steps else None
        self._writer = _Writer(self.tracking_uri, self.experiment_name, run_name)
        self.isolate_sdk = not _is_server(self.tracking_uri) if isolate_sdk is None else bool(isolate_sdk)
        self._backend: BackendProcess | InProcessBackend | None = None  # where self._writer's sends run
        self._key: str | None = None
        self._restored = False
        self._phase = "idle"  # -> "begun" (on_train_begin) -> "open" (sink running) -> "idle"
        self._params: dict[str, Any] = {}
        self._names: dict[str, str] = {}
        # One record per LOGGER_FLUSH_SECONDS, not one per step: an MLflow request costs the
        # client (GIL time) and the server far more than its payload does.
        self._points = PendingPoints()
        self._staged = 0
        self._early_alerts: list[dict[str, Any]] = []

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the worker created (or found) the run."""
        return self._writer.run_ids.get(self._key) if self._key else None

    def get_config(self) -> dict[str, Any]:
        return {"tracking_uri": _safe_uri(self.tracking_uri), "experiment_name": self.experiment_name,
                "run_name": self.run_name, "log_every_n_steps": self.log_every_n_steps, "dir": self.dir,
                "log_model": self.log_model, "shutdown_timeout": self.shutdown_timeout, "tags": self.tags,
                "isolate_sdk": self.isolate_sdk}

    # ---------------------------------------------------------------- hooks (training thread)

    @hookimpl
    def on_train_begin(self, trainer):
        if self._phase == "open":  # the last model.fit raised: Keras told no callback
            log.warning("MLflowLogger: the previous fit ended without on_train_end; marking run %s FAILED", self.run_id)
            self._finish("FAILED")
        if not self._restored:
            self._key = uuid.uuid4().hex
        self._params = trainer.run_params()
        self._points = PendingPoints()
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
        for record in self.batch_log_cadence.picks(records):
            self._points.add(record.step, record.logs, record.time)  # read at hand-off (PendingPoints)
        if self._points:
            self._put("metrics")

    @hookimpl
    def on_log(self, trainer, step, logs):  # epoch records (batch records come to on_log_steps)
        if self._phase != "open" and not self._ready():
            return
        values = {f"epoch/{name}": value for name, value in logs.items()}
        values["epoch"] = trainer.epoch
        if self._points.add(step, values):
            self._put("metrics")

    @hookimpl
    def on_alert(self, alert):
        # May come from a watchdog thread while the training thread logs: hand the record to
        # the sink's queue directly (thread-safe), never through the point batching.
        record = {"type": "alert", "run": self._key, "kind": alert.kind, "level": alert.level, "title": alert.title,
                  "text": alert.text, "step": alert.step, "time": alert.time}
        if self._phase == "open":
            self.sink.put(record)
        elif self._phase == "begun":  # before the first step (a hung compilation): sent on open
            self._early_alerts.append(record)

    @hookimpl
    def on_checkpoint_saved(self, filepath):
        if self._ready():
            self._put("artifact", path=str(self._stage(filepath)), artifact_path="checkpoints")

    # trylast: other plugins' on_train_end / on_exception may still announce a checkpoint
    # (background writes are announced when they finish) or log; the run closes after them.
    @hookimpl(trylast=True)
    def on_train_end(self, trainer):
        if not self._ready():
            return
        if self.log_model:
            try:
                path = self._stage(None, "model.keras")
                trainer.model.save(str(path))
                self._put("artifact", path=str(path), artifact_path="model")
            except Exception as exc:  # e.g. a subclassed model Keras cannot serialise
                log.warning("MLflowLogger: could not save the final model (%s: %s)", type(exc).__name__, exc)
        self._finish("FINISHED")

    @hookimpl(trylast=True)
    def on_exception(self, exception):
        if self._ready():
            self._finish("KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED")

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"run_key": self._key, "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._key = state.get("run_key") or uuid.uuid4().hex
        if state.get("run_id"):
            self._writer.run_ids[self._key] = state["run_id"]
        self._restored = True

    # ---------------------------------------------------------------- helpers

    def _ready(self) -> bool:
        """Open the run on the first event after on_train_begin; False when no run is going."""
        if self._phase == "begun":
            resumed, self._restored = self._restored, False
            self._key = self._key or uuid.uuid4().hex
            spool = Spool(Path(self.dir) / f"mlflow-{self._key}.spool.jsonl",
                          {"plugin": "mlflow", "config": self._writer.config()})
            self._backend = (BackendProcess(_Writer, self.tracking_uri, self.experiment_name, self.run_name)
                             if self.isolate_sdk else InProcessBackend(self._writer))
            self.sink = LogSink(f"mlflow-{self._key[:8]}", self._send, spool=spool, flush_interval=LOGGER_FLUSH_SECONDS,
                                shutdown_timeout=self.shutdown_timeout)
            _http_env(self.tracking_uri, +1)
            self._phase = "open"
            self._put("start", ts=_now_ms(), run_name=self.run_name, tags=self.tags, resumed=resumed)
            self._put("params", params=_flatten(self._params))
            while self._early_alerts:
                self.sink.put({**self._early_alerts.pop(0), "run": self._key})
        return self._phase == "open"

    def _send(self, records: list[dict[str, Any]]) -> None:
        """The sink's send; the run ids known here go along and come back (a child has its own)."""
        self._writer.run_ids.update(self._backend.call("send", records, dict(self._writer.run_ids)))

    def _put(self, kind: str, **fields: Any) -> None:
        if kind != "metrics" and self._points:  # keep the order: metrics logged before come first
            self._put("metrics")
        if kind == "metrics":
            fields["points"] = [[step, ts, self._metrics(values)] for step, ts, values in self._points.take()]
        self.sink.put({"type": kind, "run": self._key, **fields})

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
                key = self._names[name] = _clean_key(name)
            out[key] = number
        return out

    def _stage(self, source: str | None, name: str | None = None) -> Path:
        """A private path for a file waiting for upload (a hard link to ``source`` if given)."""
        self._staged += 1
        target = Path(self.dir) / f"mlflow-{self._key}-artifacts" / str(self._staged) / (name or Path(source).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source is not None:
            if Path(source).is_dir():
                shutil.copytree(source, target)
            else:
                try:
                    os.link(source, target)  # O(1), and immune to the original being rotated away
                except OSError:
                    shutil.copy2(source, target)
        return target

    def _finish(self, status: str) -> None:
        self._put("status", status=status, ts=_now_ms())
        self._phase = "idle"
        try:
            self.sink.close(self.shutdown_timeout)
        finally:
            self._backend.close()
            self._backend = None
            _http_env(self.tracking_uri, -1)
            staged = Path(self.dir) / f"mlflow-{self._key}-artifacts"
            if staged.is_dir() and not any(staged.iterdir()):
                staged.rmdir()

    @classmethod
    def replay_spool(cls, path: str | os.PathLike) -> int:
        """Deliver the records of a spool left by an earlier run (``corebus sync``); returns how
        many were delivered. Delivered records leave the spool; metrics the server already has
        (same key and step) are skipped."""
        require_module("mlflow", extra="mlflow", what="MLflowLogger")
        header, records = read_spool(path)
        config = header.get("config", {})
        writer = _Writer(config["tracking_uri"], config["experiment_name"], config.get("run_name"), verify=True)
        _http_env(writer.tracking_uri, +1)
        try:
            sent = replay_spool(path, writer.send, what="MLflowLogger")
        finally:
            _http_env(writer.tracking_uri, -1)
        staged = Path(str(path).replace(".spool.jsonl", "-artifacts"))
        if sent == len(records) and staged.is_dir() and not any(staged.iterdir()):
            staged.rmdir()
        return sent


class _Writer:
    """Records -> ``MlflowClient`` calls: in the logger's child process (``isolate_sdk``) or on
    its sink's worker thread, and in ``corebus sync``.

    Every record type lands once however often its batch is retried: the run is found by its
    ``corebus.run_key`` tag before one is created, params already on the run are skipped,
    artifacts overwrite, and metrics of a request that failed (a timeout may still have been
    committed) or of a resumed run are checked against the server's history by (key, step).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str | None, verify: bool = False):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.run_ids: dict[str, str] = {}
        self._verify_all = verify
        self._verify_runs: set[str] = set()
        self._uncertain: set[tuple[str, str, int]] = set()
        self._history: dict[tuple[str, str], set[int]] = {}
        self._client: Any = None
        self._experiment_id: str | None = None
        self._rest = _RestMetrics.for_uri(tracking_uri)

    def config(self) -> dict[str, Any]:
        return {"tracking_uri": _safe_uri(self.tracking_uri), "experiment_name": self.experiment_name,
                "run_name": self.run_name}

    def send(self, records: list[dict[str, Any]], run_ids: dict[str, str] | None = None) -> dict[str, str]:
        """Deliver ``records``; returns the run ids by run key (``run_ids``: those known already,
        e.g. a resumed run's, when this writer lives in another process)."""
        self.run_ids.update(run_ids or {})
        try:
            self._send(records)
        except Exception:
            self._uncertain.update((r["run"], key, step) for r in records if r["type"] == "metrics"
                                   for step, _, values in r["points"] for key in values)
            raise
        return dict(self.run_ids)

    def _send(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import RunTag

        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        uploaded: list[Path] = []
        pending: list[Any] = []  # consecutive metrics of one run go out in one log_batch
        pending_run: tuple[str, str] | None = None
        for record in records:
            run_key, kind = record["run"], record["type"]
            run_id = self._run_id(client, record)
            if pending and (kind != "metrics" or pending_run != (run_key, run_id)):
                self._log_metrics(client, *pending_run, pending)
                pending = []
            if kind == "metrics":
                pending_run = (run_key, run_id)
                # (key, value, timestamp ms, step): mlflow.entities.Metric's argument order
                pending += [(k, v, ts, step) for step, ts, values in record["points"] for k, v in values.items()]
            elif kind == "start" and record.get("resumed"):
                self._verify_runs.add(run_key)
                client.update_run(run_id, status="RUNNING")
            elif kind == "params":
                self._log_params(client, run_id, record["params"])
            elif kind == "tags":
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()], synchronous=True)
            elif kind == "artifact":
                path = Path(record["path"])
                if not path.exists():  # uploaded and removed by a run that died before popping its spool
                    continue
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), posixpath.join(record["artifact_path"], path.name))
                else:
                    client.log_artifact(run_id, str(path), record["artifact_path"])
                uploaded.append(path)
            elif kind == "alert":
                self._log_alert(client, run_id, record)
            elif kind == "status":
                client.set_terminated(run_id, record["status"], end_time=record["ts"])
        if pending:
            self._log_metrics(client, *pending_run, pending)
        for path in uploaded:  # only once the whole batch is in: a retried batch uploads again
            shutil.rmtree(path.parent, ignore_errors=True)

    def _run_id(self, client: Any, record: dict[str, Any]) -> str:
        run_key = record["run"]
        run_id = self.run_ids.get(run_key)
        if run_id is None:
            experiment_id = self._experiment(client)
            found = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                tags = {**record.get("tags", {}), RUN_KEY_TAG: run_key}
                run_name = record.get("run_name") or self.run_name
                run = client.create_run(experiment_id, start_time=record.get("ts"), tags=tags, run_name=run_name)
                run_id = run.info.run_id
            self.run_ids[run_key] = run_id
        return run_id

    def _experiment(self, client: Any) -> str:
        if self._experiment_id is None:
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                self._experiment_id = experiment.experiment_id
            else:
                try:
                    self._experiment_id = client.create_experiment(self.experiment_name)
                except Exception:  # created meanwhile by another process
                    experiment = client.get_experiment_by_name(self.experiment_name)
                    if experiment is None:
                        raise
                    self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _log_alert(self, client: Any, run_id: str, record: dict[str, Any]) -> None:
        """Tags: ``corebus.alert.<kind>`` (the latest of that kind) and ``corebus.alerts`` (one
        line per alert, newest last, cut to MLflow's tag length from the oldest end)."""
        from mlflow.entities import RunTag

        line = f"step {record['step']}: [{record['level']}] {record['title']}"
        history = client.get_run(run_id).data.tags.get("corebus.alerts", "")
        if line in history.splitlines():  # a retried batch: already recorded
            return
        lines = (history + "\n" + line).strip("\n")[-MAX_TAG:]
        detail = (line + ("\n" + record["text"] if record.get("text") else ""))[:MAX_TAG]
        client.log_batch(run_id, tags=[RunTag(_clean_key(f"corebus.alert.{record['kind']}"), detail),
                                       RunTag("corebus.alerts", lines)], synchronous=True)

    def _log_params(self, client: Any, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:  # a resumed run with other settings: MLflow refuses to change a param
            log.warning("MLflowLogger: run %s keeps its first values of %s", run_id, ", ".join(changed[:10]))
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        if new:
            client.log_batch(run_id, params=new, synchronous=True)

    def _log_metrics(self, client: Any, run_key: str, run_id: str, metrics: list[Any]) -> None:
        if not (self._uncertain or self._history or self._verify_all or run_key in self._verify_runs):
            fresh = metrics  # nothing to check against the server: the common case, kept cheap
        else:
            fresh = self._unlogged(client, run_key, run_id, metrics)
        if fresh and self._rest is not None:
            self._rest.log_metrics(run_id, fresh)
        elif fresh:
            from mlflow.entities import Metric

            client.log_batch(run_id, metrics=[Metric(*m) for m in fresh], synchronous=True)
        if self._uncertain or self._history:
            for key, _, _, step in metrics:
                self._uncertain.discard((run_key, key, step))
                if (run_id, key) in self._history:
                    self._history[(run_id, key)].add(step)

    def _unlogged(self, client: Any, run_key: str, run_id: str, metrics: list[Any]) -> list[Any]:
        """The points the server does not hold yet, by (key, step), for a resumed or verified
        run (every key) or after a failed request (the keys it carried)."""
        suspects = {key for key, _, _, step in metrics if (run_key, key, step) in self._uncertain}
        check = {m[0] for m in metrics} if (self._verify_all or run_key in self._verify_runs) else suspects
        for key in check:
            if key in suspects or (run_id, key) not in self._history:
                steps = self._rest.logged_steps(run_id, key) if self._rest is not None else None
                if steps is None:
                    steps = {m.step for m in client.get_metric_history(run_id, key)}
                self._history[(run_id, key)] = steps
        return [m for m in metrics if m[3] not in self._history.get((run_id, m[0]), ())]


class _RestMetrics:
    """Metric points to a tracking server as one JSON ``runs/log-batch`` request per 1000.

    ``MlflowClient.log_batch`` turns every point into a protobuf message and back into JSON:
    ~44 us of CPU per point, on a thread that shares the GIL with training. The server's REST
    API takes the same JSON built as text at ~0.6 us per point.

    Sent through MLflow's own ``http_request`` (auth plugins, TLS settings, proxies, Databricks,
    workspaces), each request also costs ~4 ms of CPU of its own: request headers resolved
    again (with failed imports), proxy settings read from the environment, ``requests``'
    layers. To a plain ``http`` server with no proxy, no auth plugin and at most a user/password
    or token (what ``_direct_target`` checks), the headers MLflow would send are resolved once
    and the requests go out on standard-library connections (one per request): ~0.3 ms each.
    """

    ENDPOINT = "/api/2.0/mlflow/runs/log-batch"
    MAX_METRICS = 1000  # the server's limit per request (mlflow.utils.validation)
    HISTORY = "/api/2.0/mlflow/metrics/get-history"
    HISTORY_PAGE = 25_000  # points per page of a history (the server's maximum)
    TIMEOUT = 10.0  # seconds, as HTTP_ENV's MLFLOW_HTTP_REQUEST_TIMEOUT

    def __init__(self, tracking_uri: str):
        from mlflow.tracking._tracking_service.utils import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        self._creds = get_default_host_creds(tracking_uri)
        self._request, self._verify = http_request, verify_rest_response
        self._json_keys: dict[str, str] = {}
        self._direct = _direct_target(self._creds)

    @classmethod
    def for_uri(cls, tracking_uri: str) -> "_RestMetrics | None":
        if not _is_server(tracking_uri):
            return None
        try:
            return cls(tracking_uri)
        except ImportError:  # MLflow moved its REST helpers: the client's slower path still works
            return None

    def log_metrics(self, run_id: str, points: list[tuple]) -> None:
        """``points``: ``(key, value, timestamp ms, step)`` tuples (``Metric``'s argument order)."""
        bodies = [self._body(run_id, points[start:start + self.MAX_METRICS])
                  for start in range(0, len(points), self.MAX_METRICS)]
        if self._direct is not None:
            self._post_direct(bodies)
            return
        for body in bodies:
            response = self._request(self._creds, self.ENDPOINT, "POST", data=body, max_retries=0, backoff_factor=0,
                                     timeout=self.TIMEOUT, extra_headers={"Content-Type": "application/json"})
            self._verify(response, self.ENDPOINT)

    def _post_direct(self, bodies: list[bytes]) -> None:
        # A connection per request: a kept-alive one can be closed by the server while this
        # process is slow or paused between two requests (uvicorn closes it after 5 s idle), and
        # the next request then fails half-sent (broken pipe) and must be checked and resent.
        # A loopback or LAN connect costs far less than the server's ~45 ms per request.
        for body in bodies:
            self._exchange("POST", self.ENDPOINT, body)

    def logged_steps(self, run_id: str, key: str) -> set[int] | None:
        """The steps the server holds for ``key`` (``None`` where requests go through MLflow's
        machinery: use the client). Plain JSON: ``MlflowClient.get_metric_history`` parses each
        point through protobuf, ~44 µs a point, seconds of CPU for a long run's history."""
        if self._direct is None:
            return None
        steps: set[int] = set()
        token = None
        while True:
            query = {"run_id": run_id, "metric_key": key, "max_results": self.HISTORY_PAGE}
            if token:
                query["page_token"] = token
            page = json.loads(self._exchange("GET", self.HISTORY, query=query))
            steps.update(int(point.get("step", 0)) for point in page.get("metrics", ()))
            token = page.get("next_page_token")
            if not token:
                return steps

    def _exchange(self, method: str, endpoint: str, body: bytes | None = None,
                  query: dict[str, Any] | None = None) -> bytes:
        """The answer's body; a refusal raised as the sink's retryable exception."""
        host, port, base, headers = self._direct
        connection = http.client.HTTPConnection(host, port, timeout=self.TIMEOUT)
        try:
            connection.request(method, base + endpoint + (f"?{urlencode(query)}" if query else ""), body=body,
                               headers=headers)
            response = connection.getresponse()
            status, retry_after, text = response.status, response.getheader("Retry-After"), response.read()
        finally:
            connection.close()
        if status != 200:
            _raise_for_status(status, retry_after, text, endpoint)
        return text

    def _body(self, run_id: str, points: list[tuple]) -> bytes:
        """The request's JSON, one format string per point: a third of the CPU of building a
        dict per point for ``json.dumps`` (keys are few and encoded once)."""
        keys = self._json_keys
        metrics = ",".join(
            f'{{"key":{keys.get(key) or keys.setdefault(key, json.dumps(key))},'
            f'"value":{_json_number(value)},"timestamp":{timestamp},"step":{step}}}'
            for key, value, timestamp, step in points)
        return f'{{"run_id":{json.dumps(run_id)},"metrics":[{metrics}]}}'.encode()


def _direct_target(creds: Any) -> tuple[str, int, str, dict[str, str]] | None:
    """``(host, port, base path, headers)`` for requests to the server without MLflow's request
    machinery, or ``None`` where that machinery does something for this server: TLS, an auth
    plugin or signature, Databricks, a workspace header, a proxy."""
    import urllib.request

    from mlflow.tracking.request_header.registry import resolve_request_headers
    from mlflow.utils import rest_utils

    parts = urlsplit(creds.host)
    if parts.scheme != "http" or not parts.hostname:
        return None
    if (creds.auth or creds.aws_sigv4 or creds.client_cert_path or creds.use_databricks_sdk or creds.workspace_id
            or creds.client_secret or os.environ.get("_MLFLOW_DATABRICKS_TRAFFIC_ID")):
        return None
    if getattr(rest_utils, "get_request_workspace", lambda: None)():
        return None
    if "http" in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname):
        return None
    headers = {**resolve_request_headers(), "Content-Type": "application/json"}
    if creds.username and creds.password:
        token = base64.standard_b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif creds.token:
        headers["Authorization"] = f"Bearer {creds.token}"
    return parts.hostname, parts.port or 80, parts.path.rstrip("/"), headers


def _raise_for_status(status: int, retry_after: str | None, body: bytes, endpoint: str) -> None:
    """The server's refusal as an exception the sink retries (after ``Retry-After`` if given)."""
    try:
        detail = json.loads(body).get("message") or body.decode(errors="replace")
    except (ValueError, AttributeError):
        detail = body.decode(errors="replace")
    message = f"MLflow server answered {status} to {endpoint.removeprefix('/api/2.0/mlflow/')}: {detail[:500]}"
    if status in (429, 503):
        try:
            delay = float(retry_after) if retry_after is not None else None
        except ValueError:
            delay = None
        raise RetryLater(message, delay)
    raise RuntimeError(message)


def _json_number(value: float) -> str:
    """A double in protobuf's JSON: ``repr`` (shortest round-trip, as ``json.dumps``), and
    non-finite values as the strings plain JSON lacks."""
    if value - value == 0:  # finite
        return repr(float(value))
    if value != value:
        return '"NaN"'
    return '"Infinity"' if value > 0 else '"-Infinity"'


# ---------------------------------------------------------------- module helpers

_env_lock = threading.Lock()
_env_users = 0
_env_ours: dict[str, str] = {}


def _http_env(tracking_uri: str, delta: int) -> None:
    """Reference-counted short HTTP settings for MLflow, only those the user did not set."""
    global _env_users
    if not _is_server(tracking_uri):
        return
    with _env_lock:
        if delta > 0 and _env_users == 0:
            for name, value in HTTP_ENV.items():
                if name not in os.environ:
                    os.environ[name] = _env_ours[name] = value
        _env_users = max(0, _env_users + delta)
        if _env_users == 0:
            for name, value in _env_ours.items():
                if os.environ.get(name) == value:
                    del os.environ[name]
            _env_ours.clear()


def _is_server(tracking_uri: str) -> bool:
    """Whether the URI names a tracking server (HTTP), not a local store (sqlite, files)."""
    return urlsplit(tracking_uri).scheme in ("http", "https")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _clean_key(name: Any) -> str:
    """A valid MLflow metric/param/tag key: allowed characters, no path tricks, <= 250 chars."""
    key = re.sub(r"[^/\w.\- :]", "_", str(name)) or "_"
    if posixpath.normpath(key) != key or key.startswith("/"):
        key = key.replace("/", "_")  # "a//b", "a/../b": MLflow refuses names that are not plain paths
    if key == "." or key.startswith(".."):
        key = "_" + key
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 9] + "_" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return key


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"fit": {"epochs": 3}}`` -> ``{"fit.epochs": "3"}``, keys and values within MLflow's limits."""
    flat: dict[str, str] = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update({k: v for k, v in _flatten(value, f"{prefix}{name}.").items() if k not in flat})
            continue
        text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if len(text) > MAX_PARAM:
            text = text[: MAX_PARAM - 3] + "..."
        flat.setdefault(_clean_key(f"{prefix}{name}"), text)
    return flat
