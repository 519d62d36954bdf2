"""MLflowLogger's MLflow Model, datasets and system metrics, through MLflow's own APIs.

Training-thread side (cheap): a few rows of the training inputs for the signature and input
example, and ``mlflow.data`` dataset records (name, digest, schema, profile) as JSON-ready dicts.
Writer side (sink thread, or ``corebus sync``): the model is loaded from the staged ``.keras``
file, given the best checkpoint's weights when asked, saved with ``mlflow.keras.save_model``
(the Keras 3 flavor ``mlflow.keras.autolog`` uses) and logged as an MLflow 3 LoggedModel of the
run, optionally registered. Everything goes through one ``MlflowClient`` with the logger's
tracking URI: MLflow's fluent ``log_model`` would use the process-global tracking URI and run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corebus import Monitor

log = logging.getLogger("corebus")

EXAMPLE_ROWS = 5  # rows of the training inputs kept as the model's input example
LOG_MODEL = (True, False, "best", "last")


def check_model_options(log_model: Any, registered_model_name: Any, system_metrics: Any) -> bool | float:
    """One clear error before training for a bad option; returns ``system_metrics`` resolved
    (``None``: MLflow's own switch, ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``)."""
    import importlib.util

    from corebus import ConfigError

    if not (isinstance(log_model, bool) or log_model in LOG_MODEL):
        raise ConfigError(
            f'MLflowLogger: log_model={log_model!r}; use True / "last" (final weights), '
            '"best" (the checkpoint plugin\'s best) or False'
        )
    if registered_model_name is not None and (
        not isinstance(registered_model_name, str) or not registered_model_name.strip()
    ):
        raise ConfigError(f"MLflowLogger: registered_model_name={registered_model_name!r}; use a name or None")
    if registered_model_name and not log_model:
        raise ConfigError("MLflowLogger: registered_model_name needs log_model=True, 'last' or 'best'")
    if system_metrics is None:
        from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

        system_metrics = bool(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get())
    if not isinstance(system_metrics, (bool, int, float)) or (
        not isinstance(system_metrics, bool) and system_metrics <= 0
    ):
        raise ConfigError(
            f"MLflowLogger: system_metrics={system_metrics!r}; use True, False or a sampling interval in seconds"
        )
    if system_metrics is not False and importlib.util.find_spec("psutil") is None:
        raise ConfigError('MLflowLogger: system_metrics needs psutil; pip install "corebus[mlflow]"')
    return system_metrics


class ModelRecorder:
    """The training-thread side of ``log_model`` / ``log_datasets``: a few training rows (the
    signature and input example) and the dataset records, taken once before the first step; a
    staged link to the best checkpoint seen; at the end, the final model's record for the writer.
    ``stage`` is the logger's :meth:`corebus.kit.LoggerOutbox.stage`."""

    def __init__(self) -> None:
        self.example: Any = None
        self.datasets: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # the best checkpoint seen (log_model="best")

    def begin(self, trainer: Any, log_model: Any, log_datasets: bool) -> None:
        self.example, self.datasets, self.best = None, [], None
        inputs = fit_inputs(trainer)
        if inputs is None:
            if log_datasets:
                log.warning(
                    "MLflowLogger: log_datasets needs the data, which Keras does not show callbacks "
                    "inside model.fit; use corebus.Trainer(...).fit to record them"
                )
            return
        if log_model:
            self.example = input_example(inputs.get("x"))
        if log_datasets:
            try:
                self.datasets = dataset_records(inputs)
            except Exception as exc:  # never a reason to stop training
                log.warning("MLflowLogger: could not describe the datasets (%s: %s)", type(exc).__name__, exc)

    def track_best(self, trainer: Any, filepath: str, metadata: dict[str, Any], stage: Callable[..., Path]) -> None:
        """Keep a link to the best ranked checkpoint (by the checkpoint plugin's own monitor and
        mode): ``save_top_k`` may delete it from disk before the end of training."""
        value, name = metadata.get("value"), metadata.get("monitor")
        if value is None or not name or metadata.get("last"):
            return
        mode = next(
            (
                getattr(p, "mode", "auto")
                for p in trainer.bus.plugins.values()
                if getattr(p, "monitor", None) == name and hasattr(p, "mode")
            ),
            "auto",
        )
        monitor = Monitor(name, mode if isinstance(mode, str) else "auto", owner="MLflowLogger")
        if self.best is not None:
            monitor.resolve(trainer.model)
            if not monitor.better(value, self.best["value"]):
                return
            shutil.rmtree(Path(self.best["path"]).parent, ignore_errors=True)
        self.best = {
            "path": str(stage(filepath)),
            "kind": metadata.get("kind", "model"),
            "value": value,
            "monitor": name,
            "epoch": metadata.get("epoch"),
        }

    def record(
        self, trainer: Any, stage: Callable[..., Path], log_model: Any, registered_model_name: str | None
    ) -> dict[str, Any]:
        """The final model saved as a staged ``.keras`` file (training thread, at the end) and the
        fields of its ``model`` record; the writer makes it an MLflow Model (with the best
        checkpoint's weights for ``"best"``)."""
        path = stage(None, "model.keras")
        trainer.model.save(str(path))
        example = None
        if self.example is not None:
            example = path.parent / "example.npz"
            save_example(self.example, example)
        best, self.best = self.best, None
        if log_model == "best" and best is None:
            log.warning(
                "MLflowLogger: log_model='best' but no checkpoint with a monitored value was announced "
                "(add a ModelCheckpoint with a monitor); logging the last weights"
            )
        return {
            "key": uuid.uuid4().hex,
            "path": str(path),
            "example": example and str(example),
            "best": best and {"path": best["path"], "kind": best["kind"]},
            "weights": "best" if best else "last",
            "monitor": best and best["monitor"],
            "best_value": best and best["value"],
            "best_epoch": best and best["epoch"],
            "registered_model_name": registered_model_name,
            "step": trainer.global_step,
        }


def fit_inputs(trainer: Any) -> dict[str, Any] | None:
    """What the trainer trains on (``Trainer.fit`` sets it); ``None`` inside ``model.fit``,
    where Keras shows callbacks no data."""
    inputs = getattr(trainer, "fit_inputs", None)
    return inputs if isinstance(inputs, dict) else None


def input_example(x: Any) -> dict[str, Any] | Any | None:
    """The first rows of ``x`` (an array, a dict of arrays, or a ``tf.data.Dataset`` of batches)
    as numpy; ``None`` for other inputs (a generator would be consumed by a look)."""
    import numpy as np

    try:
        import tensorflow as tf

        if isinstance(x, tf.data.Dataset):
            element = next(iter(x.take(1)))
            x = element[0] if isinstance(element, (tuple, list)) else element
        if isinstance(x, dict):
            return {str(k): np.asarray(v)[:EXAMPLE_ROWS] for k, v in x.items()}
        if hasattr(x, "shape") and hasattr(x, "__getitem__"):
            return np.asarray(x[:EXAMPLE_ROWS])
    except Exception as exc:  # an input the example cannot be cut from: the model's spec is used
        log.warning("MLflowLogger: no input example from the training data (%s: %s)", type(exc).__name__, exc)
    return None


def save_example(example: Any, path: Path) -> None:
    import numpy as np

    np.savez(path, **(example if isinstance(example, dict) else {"": example}))


def load_example(path: str) -> Any:
    import numpy as np

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays[""] if list(arrays) == [""] else arrays


def dataset_records(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """``mlflow.data`` datasets of the training and validation inputs, as ``mlflow.keras.autolog``
    builds them (contexts ``train`` / ``eval``), reduced to their JSON-ready entity fields."""
    import numpy as np
    import tensorflow as tf
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.data.tensorflow_dataset import from_tensorflow
    from mlflow.tracking.context import registry

    source = CodeDatasetSource(tags=registry.resolve_tags())
    val = inputs.get("validation_data")
    if isinstance(val, (tuple, list)):
        val = (val[0], val[1] if len(val) > 1 else None)
    out = []
    for context, data in (("train", (inputs.get("x"), inputs.get("y"))), ("eval", val)):
        if data is None:
            continue
        features, targets = data if isinstance(data, tuple) else (data, None)
        if isinstance(features, tf.data.Dataset):
            dataset = from_tensorflow(features=features, source=source, name=context)
        elif isinstance(features, (np.ndarray, dict)) or hasattr(features, "__array__"):
            if not isinstance(features, dict):
                features = np.asarray(features)
            targets = None if targets is None or isinstance(targets, dict) else np.asarray(targets)
            dataset = from_numpy(features=features, targets=targets, source=source, name=context)
        else:
            log.warning(
                "MLflowLogger: log_datasets records arrays and tf.data datasets; the %s input is a %s",
                context,
                type(features).__name__,
            )
            continue
        entity = dataset._to_mlflow_entity()
        out.append(
            {
                "context": context,
                "name": entity.name,
                "digest": entity.digest,
                "source_type": entity.source_type,
                "source": entity.source,
                "schema": entity.schema,
                "profile": entity.profile,
            }
        )
    return out


def log_datasets(client: Any, run_id: str, record: dict[str, Any]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(
            Dataset(**{k: v for k, v in d.items() if k != "context"}),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])],
        )
        for d in record["datasets"]
    ]
    client.log_inputs(run_id, datasets=inputs)  # the store skips an input the run already has


def start_system_metrics(run_id: str, tracking_uri: str, interval: float | None, resumed: bool) -> Any:
    """MLflow's own sampler (CPU, memory, disk, network, GPU where present) on its own thread,
    logging ``system/...`` metrics to the run; it stops when the run stops RUNNING."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    kwargs = {} if interval is None else {"sampling_interval": interval}
    monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=tracking_uri, **kwargs)
    monitor.start()
    return monitor


def prepare_model(record: dict[str, Any], target: str, mlflow_model: Any) -> None:
    """Build the model to log (final weights, or the best checkpoint's) and save it as an MLflow
    Model under ``target`` with a signature from the training rows and an input example."""
    import keras
    import mlflow.keras
    from mlflow.keras.utils import get_model_signature
    from mlflow.models import infer_signature

    model = keras.saving.load_model(record["path"], compile=False)
    best = record.get("best")
    if best:
        if best["kind"] == "weights":
            model.load_weights(best["path"])
        else:
            model = keras.saving.load_model(best["path"], compile=False)
    example = load_example(record["example"]) if record.get("example") else None
    signature = None
    if example is not None:
        try:
            signature = infer_signature(example, model.predict(example, verbose=0))
        except Exception as exc:  # e.g. outputs MLflow cannot describe: the model's spec below
            log.warning("MLflowLogger: signature from the training rows failed (%s); using the model's inputs", exc)
            example = None
    if signature is None:
        signature = get_model_signature(model)  # what mlflow.keras.autolog records
    # Pinned requirements, not MLflow's inference (a subprocess importing TensorFlow again).
    mlflow.keras.save_model(
        model,
        target,
        mlflow_model=mlflow_model,
        signature=signature,
        input_example=example,
        pip_requirements=mlflow.keras.get_default_pip_requirements(),
    )


def log_model(client: Any, experiment_id: str, run_id: str, record: dict[str, Any], done: dict[str, str]) -> None:
    """``record`` -> an MLflow LoggedModel of the run (what ``mlflow.keras.log_model`` makes),
    registered as a new version of ``record["registered_model_name"]`` when given.

    A model that cannot be built or saved (e.g. a custom layer Keras cannot load back) is a
    warning and a ``corebus.log_model_error`` run tag, not a retried record: the run still
    finishes with training's own status. Network and disk errors (``OSError``) are retried.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, RunTag
    from mlflow.models import Model

    key = record["key"]
    try:
        # Steps remembered in ``done``: a retried batch (OSError) goes on where it failed.
        if key not in done:
            done[key] = client.create_logged_model(
                experiment_id, name="model", source_run_id=run_id, tags={"corebus.weights": record["weights"]}
            ).model_id
        model_id = done[key]
        if key + "/logged" not in done:
            logged = client.get_logged_model(model_id)
            with tempfile.TemporaryDirectory() as tmp:
                target = os.path.join(tmp, "model")
                os.makedirs(target)
                prepare_model(
                    record,
                    target,
                    Model(
                        artifact_path=logged.artifact_location, model_uuid=model_id, run_id=run_id, model_id=model_id
                    ),
                )
                client.log_model_artifacts(model_id, target)
            client.log_outputs(run_id, [LoggedModelOutput(model_id, step=record.get("step") or 0)])
            client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            done[key + "/logged"] = model_id
        name = record.get("registered_model_name")
        if name and key + "/registered" not in done:
            _register(client, name, client.get_logged_model(model_id), run_id, record)
            done[key + "/registered"] = name
    except OSError:
        raise
    except Exception as exc:
        log.warning(
            "MLflowLogger: could not log the model of run %s (%s: %s); the run keeps its status",
            run_id,
            type(exc).__name__,
            exc,
        )
        client.log_batch(
            run_id, tags=[RunTag("corebus.log_model_error", f"{type(exc).__name__}: {exc}"[:8000])], synchronous=True
        )


def _register(client: Any, name: str, logged: Any, run_id: str, record: dict[str, Any]) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"run_id": run_id, "weights": record["weights"]}
    for field in ("monitor", "best_value", "best_epoch"):
        if record.get(field) is not None:
            tags[field] = str(record[field])
    # The storage location itself, not "models:/<id>": a local store's registry resolves that
    # through MLflow's process-global tracking URI, which need not be this logger's.
    client.create_model_version(
        name, source=logged.artifact_location, run_id=run_id, tags=tags, model_id=logged.model_id
    )
