"""Report a run to Ray Train: epoch logs as metrics, run snapshots as checkpoints, resume from them.

Inside a Ray Train worker loop (``ray.train.tensorflow.TensorflowTrainer``, Ray Train V2)::

    def train_loop(config):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()   # Ray has set TF_CONFIG
        with strategy.scope():
            model = build_model()
        trainer = corebus.Trainer(model, "adam", loss, strategy=strategy, plugins=["ray_train", "early_stopping"])
        trainer.fit(x, y, epochs=10, batch_size=256)

    result = TensorflowTrainer(train_loop, scaling_config=ScalingConfig(num_workers=2),
                               run_config=RunConfig(failure_config=FailureConfig(max_failures=2))).fit()

``result.metrics`` holds the last epoch's logs; ``result.checkpoint`` holds a corebus run
snapshot (model, optimizer, LR state, every plugin's state, data position, RNG). A worker group
that Ray restarts after a failure, or a new run given ``resume_from=result.checkpoint``,
continues from it at the exact next step.

Ray's ``storage_path`` may be an object-store URL: ``RunConfig(name=..., **storage_config("s3://bucket/runs"))``
checks before training that the store takes writes, and hands Ray the store through corebus's
fsspec layer (same credentials and ``AWS_ENDPOINT_URL`` as every other corebus path).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from corebus import Cadence, ConfigError, RunSnapshot, hookimpl, require_module
from corebus.kit import arrow_filesystem, check_writable, is_remote

log = logging.getLogger("corebus")

__all__ = ["RayTrainReport", "load_snapshot", "storage_config"]


def _ray_train() -> Any:
    return require_module("ray.train", extra="ray", what="RayTrainReport (ray_train)")


def load_snapshot(checkpoint: Any) -> RunSnapshot:
    """The corebus run snapshot inside a Ray ``Checkpoint`` written by ``ray_train`` (e.g.
    ``result.checkpoint``), verified against its manifest; its arrays are host copies."""
    with checkpoint.as_directory() as directory:
        snapshot = RunSnapshot.latest(directory)
    if snapshot is None:
        raise ConfigError(f"{checkpoint} holds no corebus run snapshot: was it written by the ray_train plugin?")
    return snapshot


def storage_config(storage_path: str | os.PathLike) -> dict[str, Any]:
    """``RunConfig`` arguments for Ray Train's storage: a local folder, or a URL such as
    ``s3://bucket/runs`` (Ray then gets ``storage_filesystem=``, a pyarrow view of corebus's
    fsspec store: Ray's own S3 client does not read every S3-compatible server). Raises
    :class:`corebus.ConfigError` before training when the place cannot be written (a missing
    bucket, refused credentials), naming the fix."""
    if is_remote(storage_path):
        url = os.fspath(storage_path)
        check_writable(url, "Ray storage_path")
        filesystem, path = arrow_filesystem(url)
        return {"storage_path": path, "storage_filesystem": filesystem}
    path = os.path.abspath(os.fspath(storage_path))
    check_writable(path, "Ray storage_path")
    return {"storage_path": path}


def _plain(value: Any) -> Any:
    """A log value as Ray stores it: a float, or a list for a vector metric."""
    array = np.asarray(value)
    return float(array) if array.ndim == 0 else array.tolist()


class RayTrainReport:
    """Report each epoch to Ray Train, with a run-snapshot checkpoint; resume from Ray's checkpoint.

    Every worker calls ``ray.train.report`` once per epoch (Ray needs the same number of calls
    on every worker: it is a barrier); the worker of world rank 0 attaches the checkpoint, the
    others report ``checkpoint=None``. On start, ``ray.train.get_checkpoint()`` (the latest
    checkpoint after Ray restarted the worker group, or ``resume_from_checkpoint=``) is restored
    into the run on every worker before the first step, so training continues at the exact step.

    :param checkpoint_every: attach a checkpoint every N epochs (and always at the last epoch of
        ``fit`` and when training stops early); ``None``: metrics only, nothing to resume from.
    :param metrics: what to report, as ``ray.train.tensorflow.keras.ReportCheckpointCallback``
        takes it: ``None`` (every epoch log), a key, a list of keys, or ``{reported_name: key}``.
        With ``None`` each optimizer's current ``learning_rate`` is added when the logs lack it;
        ``epoch`` (0-based) and ``step`` (global optimizer step) are always added.
    :param resume_from: a ``ray.train.Checkpoint`` (or its path) to start from when Ray has none
        for this run: Ray Train V2 removed ``TensorflowTrainer(resume_from_checkpoint=)`` and
        passes it through ``train_loop_config`` instead. A checkpoint of the run itself (after Ray
        restarted the worker group) takes precedence.
    :param report_every_n_steps: also report the train batch logs each time the global step
        crosses a multiple of N (metrics only, as Ray's callback does with
        ``report_metrics_on="train_batch_end"``); ``None``: epochs only.

    In ``model.fit`` (through ``corebus.KerasCallback``) it reports and checkpoints the same
    way; Keras restarts epochs from their first batch, so resume there is per epoch (always at a
    checkpoint here: checkpoints are taken at epoch ends). Keras 3's ``model.fit`` does not run
    under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585): use ``corebus.Trainer`` for
    several workers, ``model.fit`` for one.
    """

    # Every worker must report (a barrier in Ray); only rank 0 attaches the checkpoint.
    runs_on = "all"
    # The snapshot holds what history and the report recorded for the epoch.
    runs_after = ("history", "report")

    def __init__(
        self,
        checkpoint_every: int | None = 1,
        metrics: str | list[str] | dict[str, str] | None = None,
        report_every_n_steps: int | None = None,
        resume_from: Any = None,
    ):
        if checkpoint_every is not None and (
            isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
        ):
            raise ConfigError(
                f"ray_train: checkpoint_every={checkpoint_every!r}; use a positive number of epochs, "
                "or None for metrics only"
            )
        if report_every_n_steps is not None and (
            isinstance(report_every_n_steps, bool)
            or not isinstance(report_every_n_steps, int)
            or report_every_n_steps < 1
        ):
            raise ConfigError(
                f"ray_train: report_every_n_steps={report_every_n_steps!r}; use a positive number of steps or None"
            )
        if metrics is not None and not (
            isinstance(metrics, str)
            or (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics))
            or (
                isinstance(metrics, Mapping)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in metrics.items())
            )
        ):
            raise ConfigError(
                f"ray_train: metrics={metrics!r}; use None, a log key, a list of keys or {{reported_name: key}}"
            )
        train = _ray_train()  # a missing [ray] extra is an error when the run is configured
        if isinstance(resume_from, (str, Path)):
            if not Path(resume_from).is_dir():
                raise ConfigError(f"ray_train: resume_from={str(resume_from)!r} is not a checkpoint directory")
            resume_from = train.Checkpoint.from_directory(str(resume_from))
        elif resume_from is not None and not isinstance(resume_from, train.Checkpoint):
            raise ConfigError(
                f"ray_train: resume_from must be a ray.train.Checkpoint or its path, not {type(resume_from).__name__}"
            )
        self.resume_from = resume_from
        self.checkpoint_every = checkpoint_every
        self.metrics = metrics
        self.report_every_n_steps = report_every_n_steps
        self._cadence = Cadence.every_n(report_every_n_steps) if report_every_n_steps else None
        self.world_rank = 0
        self.reports = 0
        self.checkpoints = 0
        self.restored_step: int | None = None

    # ------------------------------------------------------------------ start

    @hookimpl(trylast=True)
    def on_train_begin(self, trainer: Any) -> None:
        # trylast: every other plugin has set up its state before the snapshot overwrites it.
        train = _ray_train()
        try:
            context = train.get_context()
            checkpoint = train.get_checkpoint()
        except RuntimeError as exc:
            raise ConfigError(
                "ray_train reports to Ray Train and only runs inside a Ray Train worker loop "
                "(the function given to ray.train.tensorflow.TensorflowTrainer, or `corebus run "
                "--workers N`); remove it from this run's plugins"
            ) from exc
        for name, plugin in trainer.bus.plugins.items():
            if "run.backup" in (getattr(plugin, "controls", ()) or ()):
                raise ConfigError(
                    f"ray_train and {name!r} both restore the run on start: under Ray Train the run resumes from "
                    f"Ray's checkpoints (checkpoint_every=); remove {name!r}"
                )
        self.world_rank = int(context.get_world_rank())
        checkpoint = checkpoint or self.resume_from
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            snapshot = RunSnapshot.restore_latest(directory, trainer)
        if snapshot is None:
            raise ConfigError(
                f"Ray's checkpoint {checkpoint.path} holds no corebus run snapshot: resume only from "
                "checkpoints the ray_train plugin wrote"
            )
        self.restored_step = trainer.global_step
        log.info(
            "ray_train: resumed from %s at step %d (epoch %d)", checkpoint.path, trainer.global_step, trainer.epoch
        )

    # ------------------------------------------------------------------ reports

    @hookimpl
    def on_train_batch_end(self, trainer: Any, logs: Any) -> None:
        if self._cadence is not None and self._cadence.due_now(trainer):
            self._report(trainer, self._select(logs, trainer, "batch"), checkpoint=False)

    @hookimpl(wrapper=True)
    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> Any:
        # A wrapper: the snapshot is taken after every plugin's on_epoch_end, so it holds their
        # state for this epoch (history's row, early stopping's counter).
        result = yield
        epochs = (getattr(trainer, "params", None) or {}).get("epochs")
        due = self.checkpoint_every is not None and (
            (epoch + 1) % self.checkpoint_every == 0
            or (epochs is not None and epoch + 1 >= epochs)
            or trainer.stop_training
        )
        self._report(trainer, self._select(logs, trainer, "epoch"), checkpoint=due)
        return result

    def _select(self, logs: Any, trainer: Any, where: str) -> dict[str, Any]:
        logs = dict(logs or {})
        wanted = self.metrics
        if wanted is None:
            chosen = logs
        else:
            pairs = (
                {wanted: wanted}
                if isinstance(wanted, str)
                else ({m: m for m in wanted} if isinstance(wanted, list) else dict(wanted))
            )
            missing = sorted(key for key in pairs.values() if key not in logs)
            if missing:
                raise ConfigError(
                    f"ray_train: metrics= names {', '.join(missing)}, not in the {where} logs "
                    f"({', '.join(sorted(logs)) or 'none'})"
                )
            chosen = {name: logs[key] for name, key in pairs.items()}
        metrics = {name: _plain(value) for name, value in chosen.items()}
        if wanted is None:  # as the loggers report it: each optimizer's learning rate, when no plugin logged it
            for name, value in trainer.learning_rate_logs().items():
                metrics.setdefault(name, _plain(value))
        metrics["epoch"] = int(trainer.epoch)
        metrics["step"] = int(trainer.global_step)
        return metrics

    def _report(self, trainer: Any, metrics: dict[str, Any], checkpoint: bool) -> None:
        train = _ray_train()
        self.reports += 1
        # Every worker captures: under MultiWorkerMirroredStrategy reading a metric's
        # sync-on-read variable is an all-reduce, which the other workers must join (a capture
        # on rank 0 alone waits for them forever while they wait in Ray's report barrier).
        snapshot = RunSnapshot.capture(trainer) if checkpoint else None
        if snapshot is None or self.world_rank != 0:
            train.report(metrics, checkpoint=None)
            return
        # Ray copies the directory to its storage during report (SYNC upload) and the copy is ours.
        directory = Path(tempfile.mkdtemp(prefix="corebus-ray-"))
        try:
            snapshot.write(directory, keep=1)
            train.report(metrics, checkpoint=train.Checkpoint.from_directory(str(directory)))
            self.checkpoints += 1
        finally:
            shutil.rmtree(directory, ignore_errors=True)
