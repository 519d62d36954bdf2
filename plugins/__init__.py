"""Built-in plugins. Each is one module, registered under the ``corebus.plugins`` entry-point
group exactly as a third-party plugin is; ``corebus.plugins.<Class>`` imports lazily."""

from __future__ import annotations

import importlib
from typing import Any

_CLASSES = {
    "History": "history",
    "ProgressBar": "progress",
    "CSVLogger": "csv_logger",
    "ModelCheckpoint": "checkpoint",
    "EarlyStopping": "early_stopping",
    "ReduceLROnPlateau": "reduce_lr_on_plateau",
    "LRSchedule": "lr_schedule",
    "GradientClipping": "gradient_clipping",
    "GradientAccumulation": "gradient_accumulation",
    "TerminateOnNaN": "terminate_on_nan",
    "BackupAndRestore": "backup",
    "StallAlert": "stall_alert",
    "AlertLog": "alert_log",
    "AlertWebhook": "alert_webhook",
    "RunReport": "report",
}

__all__ = sorted(_CLASSES)


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
