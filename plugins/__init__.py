"""Built-in plugins. Each is one module, registered under the ``corebus.plugins`` entry-point
group exactly as a third-party plugin is; ``corebus.plugins.<Class>`` imports lazily."""

from __future__ import annotations

import importlib
from typing import Any

_CLASSES = {
    "History": "history",
    "ProgressBar": "progress",
}

__all__ = sorted(_CLASSES)


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
