"""MLOps sinks (TensorBoard, MLflow, W&B) and Ray Train reporting. Each imports its SDK only when enabled;
``corebus.integrations.<Class>`` imports lazily."""

from __future__ import annotations

import importlib
from typing import Any

_CLASSES = {
    "TensorBoardLogger": "tensorboard",
    "MLflowLogger": "mlflow",
    "WandbLogger": "wandb",
    "RayTrainReport": "ray",
}

__all__ = sorted(_CLASSES)


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
