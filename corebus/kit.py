"""The plugin author's kit: the helpers corebus's own plugins and integrations are built from.

``corebus`` itself exports what a user writes a run with (``Trainer``, ``KerasCallback``,
``hookimpl``, ``Cadence``, ``Monitor``, the errors). A plugin that does more than react to
hooks takes its building blocks from here, the same ones the built-ins use:

- **Files**: :func:`atomic_path` (write to a temp file, fsync, rename), :func:`fsync_path`,
  :func:`check_writable` (fail before training, not at the first write), :class:`RunLock` (one
  run owns a directory), :class:`BackgroundWorker` (one writer thread, bounded, joined at the end).
- **Object storage** (``s3://bucket/prefix``, through fsspec): :func:`is_remote`,
  :func:`check_remote_writable` (a missing bucket or refused credentials fail before training),
  :func:`mirror_directory` (upload a local directory's new or changed files), :func:`delete_path`;
  :func:`atomic_path` and :func:`check_writable` take storage URLs too; :func:`arrow_filesystem`
  (the same store as a pyarrow file system, for Ray Train's ``storage_filesystem``).
- **Loggers**: :class:`LoggerOutbox` / :class:`OutboxTarget` (a logger's one delivery path:
  lazy open, spool, staging, snapshot flush, replay), :func:`step_points` / :func:`scalar_values`, :func:`run_status`,
  :class:`LogSink` (a bounded queue and a worker thread with retries and a spool,
  so a slow backend never blocks a step), :class:`Spool` / :func:`read_spool` /
  :func:`replay_spool`, :class:`RetryLater`, :class:`PendingPoints` (read many steps' lazy logs
  at once), :data:`LOGGER_FLUSH_SECONDS`, :class:`LoggedStep` and :class:`LazyLogs` (what
  ``on_log_steps`` / ``on_log`` hand over), :func:`redact` (secrets out of anything printed),
  :class:`BackendProcess` / :class:`InProcessBackend` / :class:`BackendError` (an SDK client in
  a child process).
- **Alerts**: :class:`Alert`, :class:`AlertGate`, :class:`AlertOutbox` (a notifier's queue).
- **State**: :class:`RunSnapshot`, :class:`SnapshotError`.
- **Parameters**: :func:`check_number` / :func:`check_choice` (a number's range, a name from a
  set: one rule and one message for every plugin), :func:`optimizer_names` (a plugin's ``optimizers=`` argument),
  :func:`require_module` (an optional SDK, with the ``pip install "corebus[extra]"`` hint).
- **Bus and reports**: :class:`PluginBus` (a bus without a trainer, for tests),
  :func:`write_report` / :func:`render_report` / :func:`compare_reports` (the run report).

Names here are public API: they keep their signatures across minor versions. The same names
stay importable from ``corebus`` for older plugins, but new code imports them from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corebus.bus.bus import PluginBus
from corebus.bus.logs import LazyLogs, LoggedStep
from corebus.bus.params import check_choice, check_number
from corebus.delivery.alerts import Alert, AlertGate, AlertOutbox
from corebus.delivery.backend_process import BackendError, BackendProcess, InProcessBackend
from corebus.delivery.io import BackgroundWorker, RunLock, atomic_path, check_writable, delete_path, fsync_path
from corebus.delivery.outbox import LoggerOutbox, OutboxTarget, PendingPoints, run_status, scalar_values, step_points
from corebus.delivery.sinks import (
    LOGGER_FLUSH_SECONDS,
    LogSink,
    RetryLater,
    Spool,
    read_spool,
    redact,
    replay_spool,
)
from corebus.delivery.snapshot import RunSnapshot, SnapshotError
from corebus.delivery.storage import arrow_filesystem, check_remote_writable, is_remote, mirror_directory
from corebus.engine.context import optimizer_names
from corebus.errors import require_module

# Imported on first use: the report module draws with matplotlib, the LR and gradient modules
# import TensorFlow.
_LAZY = {
    "write_report": "corebus.app.report",
    "render_report": "corebus.app.report",
    "compare_reports": "corebus.app.report",
    "ScaledSchedule": "corebus.engine.lr",
    "GradientPipelineOptimizer": "corebus.engine.gradients",
}

__all__ = [
    "Alert",
    "AlertGate",
    "AlertOutbox",
    "BackendError",
    "BackendProcess",
    "BackgroundWorker",
    "GradientPipelineOptimizer",
    "InProcessBackend",
    "LOGGER_FLUSH_SECONDS",
    "LazyLogs",
    "LogSink",
    "LoggedStep",
    "LoggerOutbox",
    "OutboxTarget",
    "PendingPoints",
    "PluginBus",
    "RetryLater",
    "RunLock",
    "RunSnapshot",
    "ScaledSchedule",
    "SnapshotError",
    "Spool",
    "arrow_filesystem",
    "atomic_path",
    "check_choice",
    "check_number",
    "check_remote_writable",
    "check_writable",
    "compare_reports",
    "delete_path",
    "fsync_path",
    "is_remote",
    "mirror_directory",
    "optimizer_names",
    "read_spool",
    "redact",
    "render_report",
    "replay_spool",
    "require_module",
    "run_status",
    "scalar_values",
    "step_points",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corebus.kit' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from corebus.app.report import compare_reports, render_report, write_report
    from corebus.engine.gradients import GradientPipelineOptimizer
    from corebus.engine.lr import ScaledSchedule
