"""The MLflow logger's records turned into ``MlflowClient`` calls, and the small rules both
halves share (MLflow's key limits, secret-free URIs, short HTTP settings).

The writer runs on the logger's sink thread (or in its child process, ``isolate_sdk``) and in
``corebus sync``. Everything goes through MLflow's own client, so every tracking backend MLflow
supports works: file and sqlite stores, servers with auth or TLS, hosted servers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from .mlflow_model import log_datasets, log_model, start_system_metrics

log = logging.getLogger("corebus")

RUN_KEY_TAG = "corebus.run_key"  # names the run across retries, resumes and `corebus sync`
MAX_KEY, MAX_PARAM, MAX_TAG = 250, 6000, 8000  # MLflow's limits (mlflow.utils.validation)
# MLflow's HTTP client retries a dead server for ~4 minutes by default; the sink retries instead.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
}
# MLflow prints "View run <name> at: <tracking URI>/..." when a run ends, password included;
# this variable (read per call) is MLflow's only switch for it.
QUIET_URL_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class _Writer:
    """Records -> ``MlflowClient`` calls.

    Every record type lands once however often its batch is retried: the run is found by its
    ``corebus.run_key`` tag before one is created, params already on the run are skipped,
    artifacts overwrite, deletions check the listing first, and metrics of a request that
    failed (a timeout may still have been committed) or of a resumed run are checked against
    the run's history (``get_metric_history``) by (key, step).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str | None,
        verify: bool = False,
        artifact_location: str | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.run_ids: dict[str, str] = {}
        self._verify_all = verify
        self._verify_runs: set[str] = set()
        self._uncertain: set[tuple[str, str, int]] = set()
        self._history: dict[tuple[str, str], set[int]] = {}
        self._client: Any = None
        self._experiment_id: str | None = None
        self._monitors: dict[str, Any] = {}  # MLflow's system-metrics samplers by run key
        self._models: dict[str, str] = {}  # model records' progress (mlflow_model.log_model)

    def config(self) -> dict[str, Any]:
        """What ``corebus sync`` needs to rebuild this writer (no credentials)."""
        return {
            "tracking_uri": _without_credentials(self.tracking_uri),
            "experiment_name": self.experiment_name,
            "run_name": self.run_name,
            "artifact_location": self.artifact_location,
        }

    def send(self, records: list[dict[str, Any]], run_ids: dict[str, str] | None = None) -> dict[str, str]:
        """Deliver ``records``; returns the run ids by run key (``run_ids``: those known already,
        e.g. a resumed run's, when this writer lives in another process)."""
        self.run_ids.update(run_ids or {})
        try:
            self._send(records)
        except Exception as exc:
            self._uncertain.update(
                (r["run"], key, step)
                for r in records
                if r["type"] == "metrics"
                for step, _, values in r["points"]
                for key in values
            )
            # MLflow's errors name the request's URL: with a password in the tracking URI, so
            # the sink's warning (and the console) would show it.
            message = redact_uri_secrets(str(exc), self.tracking_uri)
            if message != str(exc):
                error = RuntimeError(f"{type(exc).__name__}: {message}")
                error.retry_after = getattr(exc, "retry_after", None)
                raise error from None
            raise
        return dict(self.run_ids)

    def _send(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, RunTag

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
                pending += [Metric(k, v, ts, step) for step, ts, values in record["points"] for k, v in values.items()]
            elif kind == "start":
                if record.get("resumed"):
                    self._verify_runs.add(run_key)
                    client.update_run(run_id, status="RUNNING")
                # not for `corebus sync` (verify): the run it replays is long over
                if (
                    record.get("system_metrics") not in (None, False)
                    and not self._verify_all
                    and run_key not in self._monitors
                ):
                    interval = None if record["system_metrics"] is True else float(record["system_metrics"])
                    self._monitors[run_key] = start_system_metrics(
                        run_id, self.tracking_uri, interval, bool(record.get("resumed"))
                    )
            elif kind == "datasets":
                log_datasets(client, run_id, record)
            elif kind == "model":
                staged = [
                    Path(p)
                    for p in (record["path"], record.get("example"), (record.get("best") or {}).get("path"))
                    if p
                ]
                if not all(p.exists() for p in staged):  # logged and removed by a run that died before popping
                    continue
                log_model(client, self._experiment(client), run_id, record, self._models)
                uploaded += staged
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
            elif kind == "forget":
                self._delete_artifact(client, run_id, record["artifact"])
            elif kind == "alert":
                self._log_alert(client, run_id, record)
            elif kind == "status":
                if run_key in self._monitors:  # its last samples first, while the run is RUNNING
                    self._monitors.pop(run_key).finish()
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
            if experiment is None:
                try:
                    self._experiment_id = client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_location
                    )
                    return self._experiment_id
                except Exception:  # created meanwhile by another process
                    experiment = client.get_experiment_by_name(self.experiment_name)
                    if experiment is None:
                        raise
            self._experiment_id = experiment.experiment_id
            wanted = self.artifact_location
            if wanted and experiment.artifact_location.rstrip("/") != wanted.rstrip("/"):
                # MLflow fixes an experiment's artifact location when it is created
                log.warning(
                    "MLflowLogger: experiment %r already exists and keeps its artifact location %s "
                    "(not %s); pick another experiment_name to store artifacts there",
                    self.experiment_name,
                    experiment.artifact_location,
                    wanted,
                )
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
        client.log_batch(
            run_id,
            tags=[
                RunTag(clean_key(f"corebus.alert.{record['kind']}"), detail),
                RunTag("corebus.alerts", lines),
            ],
            synchronous=True,
        )

    def _log_params(self, client: Any, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:  # a resumed run with other settings: MLflow refuses to change a param
            log.warning("MLflowLogger: run %s keeps its first values of %s", run_id, ", ".join(changed[:10]))
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        if new:  # log_batch splits into MLflow's per-request limits (100 params, 1000 metrics)
            client.log_batch(run_id, params=new, synchronous=True)

    def _delete_artifact(self, client: Any, run_id: str, artifact: str) -> None:
        """Remove a file the checkpoint plugin deleted (``log_checkpoints="kept"``)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        folder = posixpath.dirname(artifact)
        if artifact not in {a.path for a in client.list_artifacts(run_id, folder)}:
            return  # a retried batch: already gone
        repository = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=self.tracking_uri)
        try:
            repository.delete_artifacts(artifact)
        except NotImplementedError:  # a store without deletion: say so once per file
            log.warning("MLflowLogger: the artifact store of run %s cannot delete %s; it stays", run_id, artifact)

    def _log_metrics(self, client: Any, run_key: str, run_id: str, metrics: list[Any]) -> None:
        if not (self._uncertain or self._history or self._verify_all or run_key in self._verify_runs):
            fresh = metrics  # nothing to check against the server: the common case, kept cheap
        else:
            fresh = self._unlogged(client, run_key, run_id, metrics)
        if fresh:  # log_batch splits into MLflow's per-request limits
            client.log_batch(run_id, metrics=fresh, synchronous=True)
        if self._uncertain or self._history:
            for metric in metrics:
                self._uncertain.discard((run_key, metric.key, metric.step))
                if (run_id, metric.key) in self._history:
                    self._history[(run_id, metric.key)].add(metric.step)

    def _unlogged(self, client: Any, run_key: str, run_id: str, metrics: list[Any]) -> list[Any]:
        """The points the run does not hold yet, by (key, step), for a resumed or verified run
        (every key) or after a failed request (the keys it carried)."""
        suspects = {m.key for m in metrics if (run_key, m.key, m.step) in self._uncertain}
        check = {m.key for m in metrics} if (self._verify_all or run_key in self._verify_runs) else suspects
        for key in check:
            if key in suspects or (run_id, key) not in self._history:
                self._history[(run_id, key)] = {m.step for m in client.get_metric_history(run_id, key)}
        return [m for m in metrics if m.step not in self._history.get((run_id, m.key), ())]


# ---------------------------------------------------------------- shared rules

_env_lock = threading.Lock()
_env_users = 0
_env_ours: dict[str, str] = {}


def mlflow_env(tracking_uri: str, delta: int) -> None:
    """Reference-counted settings for MLflow while a run is open, only those the user did not
    set: short HTTP retries to a server, and no run link printed when the URI holds a password."""
    global _env_users
    settings = {
        **(HTTP_ENV if is_server(tracking_uri) else {}),
        **(QUIET_URL_ENV if urlsplit(tracking_uri).password else {}),
    }
    if not settings:
        return
    with _env_lock:
        if delta > 0:
            for name, value in settings.items():
                if name not in os.environ:
                    os.environ[name] = _env_ours[name] = value
        _env_users = max(0, _env_users + delta)
        if _env_users == 0:
            for name, value in _env_ours.items():
                if os.environ.get(name) == value:
                    del os.environ[name]
            _env_ours.clear()


def is_server(tracking_uri: str) -> bool:
    """Whether the URI names a tracking server (HTTP), not a local store (sqlite, files)."""
    return urlsplit(tracking_uri).scheme in ("http", "https")


def local_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Beside a sqlite store: ``<store dir>/mlartifacts/<experiment>`` (MLflow's own default
    would be ``./mlruns`` of whatever directory the process runs in). ``None`` elsewhere: a
    file store keeps artifacts inside itself, a server decides on its side."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(unquote(tracking_uri[len("sqlite:///") :].split("?", 1)[0]))
    folder = re.sub(r"[^\w.\-]", "_", experiment_name) or "_"
    return (database.parent / "mlartifacts" / folder).resolve().as_uri()


def _without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def safe_uri(uri: str) -> str:
    """The URI with its password (if any) shown as ``***``."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rsplit('@', 1)[1]}"))


def redact_uri_secrets(text: str, uri: str) -> str:
    """``text`` with the password of ``uri`` (raw and URL-decoded) replaced by ``***``."""
    password = urlsplit(uri).password
    for secret in {password, unquote(password)} if password else ():
        text = text.replace(secret, "***")
    return text


def clean_key(name: Any) -> str:
    """A valid MLflow metric/param/tag key: allowed characters, no path tricks, <= 250 chars."""
    key = re.sub(r"[^/\w.\- :]", "_", str(name)) or "_"
    if posixpath.normpath(key) != key or key.startswith("/"):
        key = key.replace("/", "_")  # "a//b", "a/../b": MLflow refuses names that are not plain paths
    if key == "." or key.startswith(".."):
        key = "_" + key
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 9] + "_" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return key


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"fit": {"epochs": 3}}`` -> ``{"fit.epochs": "3"}``, keys and values within MLflow's limits."""
    flat: dict[str, str] = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update({k: v for k, v in flatten(value, f"{prefix}{name}.").items() if k not in flat})
            continue
        text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if len(text) > MAX_PARAM:
            text = text[: MAX_PARAM - 3] + "..."
        flat.setdefault(clean_key(f"{prefix}{name}"), text)
    return flat


# ---------------------------------------------------------------- run params


def run_params(trainer: Any) -> dict[str, Any]:
    """The run's configuration (``trainer.run_params()``, configuration only), with the model's
    loss and metrics named as the user named them (serialised Keras objects by class name)."""
    params = trainer.run_params()
    params["model"] = {**params.get("model", {}), **_model_params(trainer)}
    return params


def _model_params(trainer: Any) -> dict[str, Any]:
    model = trainer.model
    config: dict[str, Any] = {}
    if getattr(model, "compiled", False):
        try:
            config = model.get_compile_config() or {}
        except Exception:  # a compile argument Keras cannot serialise: fall back below
            config = {}
    loss = config.get("loss") or getattr(trainer, "loss", None) or getattr(model, "loss", None)
    metrics = config.get("metrics") or getattr(trainer, "metrics", None)
    out: dict[str, Any] = {"loss": _name_of(loss), "metrics": _name_of(metrics or [])}
    weights = list(getattr(model, "weights", None) or ())
    if weights:
        trainable = sum(_size(v) for v in model.trainable_weights)
        total = sum(_size(v) for v in weights)
        out.update(total_params=total, trainable_params=trainable, non_trainable_params=total - trainable)
    return out


def _size(variable: Any) -> int:
    count = 1
    for dim in variable.shape:
        count *= int(dim)
    return count


def _name_of(value: Any) -> Any:
    """A loss or metric as a user named it: ``"mse"``, a class name, a function name."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_name_of(v) for v in value]
    if isinstance(value, dict):
        if "class_name" in value:  # a serialised Keras object
            return (
                value.get("config", {}).get("name")
                if isinstance(value.get("config"), dict) and value["class_name"] == "function"
                else value["class_name"]
            )
        return {str(k): _name_of(v) for k, v in value.items()}
    return getattr(value, "name", None) or getattr(value, "__name__", None) or type(value).__name__
