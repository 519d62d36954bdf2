"""A run report: what happened in a run, as ``report.json``, PNG plots and one HTML page."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time
from typing import Any

from corebus import Cadence, ConfigError, MissingExtraError, check_writable, hookimpl, write_report
from corebus.kit import is_remote

log = logging.getLogger("corebus")


class RunReport:
    """Record a run cheaply and write a report at its end (also when it fails).

    Recorded: every epoch's logs (train and validation metrics, ``learning_rate``); every
    ``log_every_n_steps`` steps the step's own loss and metrics, the gradient norm (this plugin
    asks the gradient pipeline for it, ``gradient_norm=True``) and the learning rate of each
    optimizer; LR reductions (a drop of an LR multiplier during an epoch end, e.g. by
    ``reduce_lr_on_plateau``); warm-up ends of ``lr_schedule`` plugins; early stopping's best
    and stopped epochs; checkpoint events; alerts (from any thread); and, when the run is
    profiled (``Trainer(profile=True)``), each plugin's host time.

    It writes last: ``on_train_end`` / ``on_exception`` are wrappers (outermost, ``tryfirst``),
    so the report is written after every other plugin's end hook has run (loggers closed,
    final checkpoints written), and its times, profile and checkpoint counts include them.
    Each checkpoint event records whether its file is still there at the end (``kept``; a
    policy such as ``save_top_k`` deletes files), and ``run`` counts both
    (``checkpoints_saved`` / ``checkpoints_kept``, distinct files). The report is titled with
    the run's name: ``name=``, else the trainer's ``run_name``, else the run folder holding
    ``report_dir`` (``corebus-runs/<run>/report``), else the model's name. Epoch indices in the
    JSON are Keras's (0-based, as ``History.epoch``); everything rendered counts from 1.

    At train end (or on an exception, with status ``failed`` / ``killed``) it writes into
    ``report_dir``: ``report.json``, PNG plots (curves, learning rate, gradient norm, timeline,
    overhead) and a self-contained ``report.html``. ``corebus report DIR`` re-renders them from
    the JSON; ``corebus compare DIR DIR ...`` overlays runs. Needs matplotlib (checked now).
    ``report_dir`` may be a storage URL (``s3://bucket/run/report``): the files are made locally
    and uploaded, ``report.json`` last; ``corebus report URL`` reads it back.

    Cost per step: nothing between cadence points; at one, the step's single batched host
    fetch (shared with any other reader) plus one LR read per optimizer.
    """

    runs_on = "chief"  # under tf.distribute: one writer, not one per worker
    error_policy = "warn"  # a failing report must not end the training it describes

    def __init__(
        self,
        report_dir: str | os.PathLike = "corebus-runs/report",
        log_every_n_steps: int | None = 10,
        gradient_norm: bool = True,
        name: str | None = None,
    ):
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ConfigError(
                f"RunReport: log_every_n_steps={log_every_n_steps!r}; use a positive integer, "
                "or None for epoch curves only"
            )
        if importlib.util.find_spec("matplotlib") is None:  # fail before training, not at its end
            raise MissingExtraError("the report plugin (PNG plots)", "matplotlib", "report")
        self.report_dir = os.fspath(report_dir)
        check_writable(self.report_dir, "RunReport")
        self.log_every_n_steps = log_every_n_steps
        self.gradient_norm = bool(gradient_norm)
        self.name = name
        # The gradient pipeline computes the norm inside the step only when someone asks.
        self.gradient_taps = {"norm"} if self.gradient_norm else set()
        self.batch_log_cadence = None if log_every_n_steps is None else Cadence.every_n(log_every_n_steps)
        self._lock = threading.Lock()  # alerts arrive from the watchdog's thread
        self.report: dict[str, Any] = {}
        self.files: list[str] = []

    def get_config(self) -> dict[str, Any]:
        return {
            "report_dir": self.report_dir if is_remote(self.report_dir) else os.path.abspath(self.report_dir),
            "log_every_n_steps": self.log_every_n_steps,
            "gradient_norm": self.gradient_norm,
            "name": self.name,
        }

    @hookimpl
    def on_train_begin(self, trainer):
        self._started = time.time()
        self._multipliers: dict[str, float] = {}
        with self._lock:
            self._epochs: list[dict[str, Any]] = []
            self._batches: dict[str, Any] = {"every": self.log_every_n_steps, "step": [], "values": {}}
            self._reductions: list[dict[str, Any]] = []
            self._checkpoints: list[dict[str, Any]] = []
            self._alerts: list[dict[str, Any]] = []
        self._first_step = trainer.global_step
        self._warmups = [
            {"plugin": name, "optimizer": target, "end_step": int(plugin.warmup_steps)}
            for name, plugin in trainer.bus.plugins.items()
            if getattr(plugin, "warmup_steps", 0) and getattr(plugin, "per", "step") == "step"
            for target in (getattr(plugin, "optimizers", None) or list(trainer.optimizers))
        ]
        self._config = trainer.run_params()

    @hookimpl
    def on_epoch_begin(self, trainer):
        # An LR reduction is a multiplier drop between epoch begin and the end of all epoch-end hooks.
        self._multipliers = {name: trainer.lr_for(name).multiplier for name in trainer.optimizers}

    @hookimpl
    def on_log(self, trainer, kind, step, logs):
        if kind == "batch":
            if self.batch_log_cadence is None or not self.batch_log_cadence.due_now(trainer):
                return
            values = {k: float(v) for k, v in logs.items()}  # the step's one batched fetch, LR included
            for name in trainer.optimizers:
                if _lr_key(name) not in values:
                    values[_lr_key(name)] = trainer.lr_for(name).value
            self._add_batch(step, values)
            return
        record = {"epoch": trainer.epoch, "step": step, "logs": {k: float(v) for k, v in logs.items()}}
        for name, before in self._multipliers.items():
            lr = trainer.lr_for(name)
            if lr.multiplier < before:
                self._reductions.append(
                    {
                        "epoch": trainer.epoch,
                        "step": step,
                        "optimizer": name,
                        "factor": lr.multiplier / before,
                        "lr_before": record["logs"].get(_lr_key(name)),
                        "lr_after": lr.value,
                    }
                )
            self._multipliers[name] = lr.multiplier
        with self._lock:
            self._epochs.append(record)

    def state_dict(self) -> dict[str, Any]:
        """What was recorded so far, kept in a run snapshot: a resumed run's report holds the
        whole run (each point once), not only the part after the resume."""
        if not hasattr(self, "_started"):  # nothing recorded yet (before on_train_begin)
            return {}
        with self._lock:
            return {
                "started": self._started,
                "first_step": self._first_step,
                "epochs": list(self._epochs),
                "batches": {
                    "every": self._batches["every"],
                    "step": list(self._batches["step"]),
                    "values": {k: list(v) for k, v in self._batches["values"].items()},
                },
                "reductions": list(self._reductions),
                "checkpoints": list(self._checkpoints),
                "alerts": list(self._alerts),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # saved before anything was recorded
            return
        batches = state["batches"]
        lists = [state[k] for k in ("epochs", "reductions", "checkpoints", "alerts")] + [batches["step"]]
        if (
            not all(isinstance(v, list) for v in lists)
            or not isinstance(batches["values"], dict)
            or not all(isinstance(v, list) and len(v) == len(batches["step"]) for v in batches["values"].values())
        ):
            raise ValueError("RunReport: the snapshot's report state is malformed")
        with self._lock:
            self._started, self._first_step = float(state["started"]), int(state["first_step"])
            self._epochs, self._reductions = list(state["epochs"]), list(state["reductions"])
            self._checkpoints, self._alerts = list(state["checkpoints"]), list(state["alerts"])
            self._batches = {
                "every": self.log_every_n_steps,
                "step": list(batches["step"]),
                "values": {k: list(v) for k, v in batches["values"].items()},
            }

    def _add_batch(self, step: int, values: dict[str, float]) -> None:
        batches, columns = self._batches, self._batches["values"]
        for key in values:
            if key not in columns:  # a value that appears late: earlier rows lack it
                columns[key] = [None] * len(batches["step"])
        batches["step"].append(step)
        for key, column in columns.items():
            column.append(values.get(key))

    @hookimpl
    def on_checkpoint_saved(self, trainer, filepath, step, metadata):
        with self._lock:
            self._checkpoints.append(
                {
                    "step": int(step),
                    "epoch": trainer.epoch,
                    "filepath": os.fspath(filepath),
                    "metadata": dict(metadata or {}),
                    "time": time.time(),
                }
            )

    @hookimpl
    def on_alert(self, alert):
        record = alert.to_dict()
        record["details"] = record.get("details", "")[:4000]  # stack dumps: enough to recognise them
        with self._lock:
            self._alerts.append(record)

    # Wrappers, outermost: the code after ``yield`` runs once every other plugin's end hook
    # has returned (a trylast impl would still run before other trylast ones).
    @hookimpl(wrapper=True, tryfirst=True)
    def on_train_end(self, trainer):
        try:
            return (yield)
        finally:
            self._safely_write(trainer, "finished", None)

    @hookimpl(wrapper=True, tryfirst=True)
    def on_exception(self, trainer, exception):
        try:
            return (yield)
        finally:
            # Ctrl-C, or a stop signal answered at a step boundary (corebus.Preempted, a SystemExit)
            status = "killed" if isinstance(exception, (KeyboardInterrupt, SystemExit)) else "failed"
            self._safely_write(trainer, status, f"{type(exception).__name__}: {exception}")

    def _safely_write(self, trainer: Any, status: str, error: str | None) -> None:
        # A wrapper runs outside the bus's error policy: apply this plugin's ("warn") here.
        try:
            self._write(trainer, status, error)
        except Exception as exc:  # noqa: BLE001 - a failing report must not end the run it describes
            log.warning("RunReport: writing the report failed: %s: %s", type(exc).__name__, exc)

    def _run_name(self, trainer: Any) -> str:
        if self.name:
            return str(self.name)
        if getattr(trainer, "run_name", None):
            return str(trainer.run_name)
        folder = self.report_dir.rstrip("/") if is_remote(self.report_dir) else os.path.abspath(self.report_dir)
        if os.path.basename(folder) == "report":  # corebus-runs/<run>/report
            return os.path.basename(os.path.dirname(folder))
        return str(getattr(trainer.model, "name", "") or "")

    def _write(self, trainer: Any, status: str, error: str | None) -> None:
        if not hasattr(self, "_started"):  # failed before on_train_begin ran: nothing recorded
            return
        stopper = next(
            (
                (n, p)
                for n, p in trainer.bus.plugins.items()
                if hasattr(p, "best_epoch") and hasattr(p, "stopped_epoch")
            ),
            None,
        )
        bus = trainer.bus
        with self._lock:
            checkpoints = [dict(c, kept=_exists(c["filepath"])) for c in self._checkpoints]
            files = {c["filepath"]: c["kept"] for c in checkpoints}
            self.report = {
                "format": "corebus-report",
                "version": 1,
                "run": {
                    "name": self._run_name(trainer),
                    "status": status,
                    "error": error,
                    "started": self._started,
                    "ended": time.time(),
                    "seconds": time.time() - self._started,
                    "first_step": self._first_step,
                    "global_step": trainer.global_step,
                    "params": dict(trainer.params),
                    "plugins": list(bus.plugins),
                    "optimizers": list(trainer.optimizers),
                    "checkpoints_saved": len(files),
                    "checkpoints_kept": None if None in files.values() else sum(files.values()),
                },
                "config": self._config,
                "epochs": list(self._epochs),
                "batches": self._batches,
                "lr": {"reductions": list(self._reductions), "warmup": self._warmups},
                "early_stopping": None
                if stopper is None
                else {
                    "plugin": stopper[0],
                    "monitor": getattr(stopper[1], "monitor", None),
                    "best": _number(getattr(stopper[1], "best", None)),
                    "best_epoch": stopper[1].best_epoch,
                    "stopped_epoch": stopper[1].stopped_epoch,
                },
                "checkpoints": checkpoints,
                "alerts": list(self._alerts),
                "profile": bus.profile_report() if bus.profile_enabled else None,
                "profile_note": None if bus.profile_enabled else "profile off: Trainer(profile=True)",
            }
        self.files = [str(p) for p in write_report(self.report, self.report_dir)]


def _lr_key(optimizer_name: str) -> str:
    # The epoch logs' keys (lr_schedule / reduce_lr_on_plateau), not imported: plugins stay independent.
    return "learning_rate" if optimizer_name == "default" else f"learning_rate/{optimizer_name}"


def _exists(filepath: str) -> bool | None:
    """Whether a checkpoint file (or SavedModel folder) is still there; None for object-store URLs."""
    if "://" in filepath:
        return None
    return os.path.exists(filepath)


def _number(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)
