"""corebus: a plugin-based training event bus for TensorFlow / Keras 3.

``import corebus`` is cheap: TensorFlow is imported only when the engine, the adapter or the
LR controller is first used, so plugin modules (and ``corebus plugins``) load fast.

``__all__`` is the user API. Plugin authors find their building blocks in :mod:`corebus.kit`;
built-in plugins live in ``corebus.plugins``, MLOps sinks in ``corebus.integrations``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corebus import kit
from corebus.bus.bus import hookimpl
from corebus.bus.cadence import Cadence
from corebus.bus.monitor import Monitor
from corebus.bus.registry import installed_plugins, load_plugin_config
from corebus.errors import ConfigError, CorebusError, MissingExtraError, PluginError, Preempted

__version__ = "0.1.0"

_LAZY = {
    "Trainer": "corebus.engine.trainer",
    "RunContext": "corebus.engine.context",
    "KerasCallback": "corebus.keras_adapter",
    "wrap_optimizer": "corebus.engine.gradients",
    "LearningRateController": "corebus.engine.lr",
}

# The user API: what a run is written with. A plugin's building blocks (sinks, spools, atomic
# files, alerts, snapshots...) are public under ``corebus.kit``.
__all__ = [
    "Cadence",
    "ConfigError",
    "CorebusError",
    "KerasCallback",
    "LearningRateController",
    "MissingExtraError",
    "Monitor",
    "PluginError",
    "Preempted",
    "RunContext",
    "Trainer",
    "hookimpl",
    "installed_plugins",
    "kit",
    "load_plugin_config",
    "wrap_optimizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    # The kit's names were exported here before corebus.kit existed: they still import from
    # ``corebus`` (plugins written then keep working), but are not listed in ``__all__``.
    if name in kit.__all__:
        return getattr(kit, name)
    raise AttributeError(f"module 'corebus' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from corebus.engine.context import RunContext
    from corebus.engine.gradients import wrap_optimizer
    from corebus.engine.lr import LearningRateController
    from corebus.engine.trainer import Trainer
    from corebus.keras_adapter import KerasCallback
