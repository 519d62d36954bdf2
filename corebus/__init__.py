"""corebus: a plugin-based training event bus for TensorFlow / Keras 3.

``import corebus`` is cheap: TensorFlow is imported only when the engine, the adapter or the
LR controller is first used, so plugin modules (and ``corebus plugins``) load fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .alerts import Alert, AlertGate, AlertOutbox
from .bus import PluginBus, hookimpl
from .cadence import Cadence
from .context import optimizer_names
from .errors import ConfigError, CorebusError, MissingExtraError, PluginError, Preempted, require_module
from .io import BackgroundWorker, RunLock, atomic_path, check_writable, fsync_path
from .logs import LazyLogs, LoggedStep
from .monitor import Monitor
from .registry import installed_plugins, load_plugin_config
from .backend_process import BackendError, BackendProcess, InProcessBackend
from .sinks import LOGGER_FLUSH_SECONDS, LogSink, PendingPoints, RetryLater, Spool, read_spool, redact, replay_spool
from .snapshot import RunSnapshot, SnapshotError

__version__ = "0.1.0"

_LAZY = {
    "Trainer": "corebus.trainer",
    "RunContext": "corebus.context",
    "KerasCallback": "corebus.keras_adapter",
    "wrap_optimizer": "corebus.gradients",
    "GradientPipelineOptimizer": "corebus.gradients",
    "LearningRateController": "corebus.lr",
    "ScaledSchedule": "corebus.lr",
    # the run report renderer: matplotlib is imported only when something is drawn
    "write_report": "corebus.report",
    "render_report": "corebus.report",
    "compare_reports": "corebus.report",
}

__all__ = [
    "Alert",
    "AlertGate",
    "AlertOutbox",
    "BackendError",
    "BackendProcess",
    "BackgroundWorker",
    "RunLock",
    "InProcessBackend",
    "Monitor",
    "atomic_path",
    "check_writable",
    "fsync_path",
    "Cadence",
    "ConfigError",
    "CorebusError",
    "GradientPipelineOptimizer",
    "KerasCallback",
    "LazyLogs",
    "LoggedStep",
    "LearningRateController",
    "LOGGER_FLUSH_SECONDS",
    "LogSink",
    "RetryLater",
    "Spool",
    "PendingPoints",
    "read_spool",
    "replay_spool",
    "redact",
    "MissingExtraError",
    "PluginBus",
    "PluginError",
    "Preempted",
    "RunContext",
    "RunSnapshot",
    "SnapshotError",
    "ScaledSchedule",
    "Trainer",
    "hookimpl",
    "installed_plugins",
    "load_plugin_config",
    "optimizer_names",
    "require_module",
    "wrap_optimizer",
    "write_report",
    "render_report",
    "compare_reports",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corebus' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext
    from .gradients import GradientPipelineOptimizer, wrap_optimizer
    from .keras_adapter import KerasCallback
    from .lr import LearningRateController, ScaledSchedule
    from .report import compare_reports, render_report, write_report
    from .trainer import Trainer
