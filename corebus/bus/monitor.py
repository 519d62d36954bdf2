"""Watching one metric for improvement, with Keras's semantics (``MonitorCallback``).

One helper for every plugin that monitors a quantity (checkpointing, early stopping, plateau
LR, plateau alerts), so "is this better?" is decided the same way everywhere.
"""

from __future__ import annotations

import difflib
import logging
import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from corebus.errors import ConfigError

log = logging.getLogger("corebus")

MODES = ("auto", "min", "max")


class Monitor:
    """``monitor`` name, ``mode`` (min/max/auto), ``min_delta`` and a missing-metric policy.

    ``mode="auto"`` follows Keras: ``*loss`` is minimised; otherwise the direction of the
    model's metric of that name (``_direction``), e.g. accuracy is maximised.

    Missing metrics: :meth:`value` warns once (Keras's policy, ``strict`` raises);
    :meth:`current` is the stricter check of the control plugins (a name the logs will not
    have is a :class:`ConfigError` naming the close match; see there).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        min_delta: float = 0.0,
        *,
        owner: str = "plugin",
        strict: bool = False,
    ):
        if mode not in MODES:
            raise ConfigError(f"{owner}: mode={mode!r} is unknown; use one of {', '.join(MODES)}")
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"{owner}: monitor must be a metric name such as 'val_loss'")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = abs(float(min_delta))
        self.owner = owner
        self.strict = strict
        self.op: Any = None
        self._warned = False

    def try_resolve(self, model: Any = None) -> bool:
        """:meth:`resolve` if the direction can be decided now; False (no error) if not yet."""
        try:
            self.resolve(model)
        except ConfigError:
            return False
        return True

    def resolve(self, model: Any = None) -> None:
        """Decide the direction (needs the model's metrics for ``auto``)."""
        if self.op is not None:
            return
        if self.mode == "min":
            self.op = operator.lt
        elif self.mode == "max":
            self.op = operator.gt
        else:
            name = self.monitor.removeprefix("val_")
            if name == "loss" or name.endswith("loss"):
                self.op = operator.lt
            for metric in _all_metrics(model):
                if metric.name == name and hasattr(metric, "_direction"):
                    self.op = operator.gt if metric._direction == "up" else operator.lt
            if self.op is None:
                raise ConfigError(
                    f"{self.owner}: monitor={self.monitor!r} with mode='auto', but its direction "
                    "cannot be inferred; pass mode='max' or mode='min'"
                )

    @property
    def minimize(self) -> bool:
        return self.op is operator.lt

    def is_improvement(self, value: float, reference: float | None) -> bool:
        """Keras's rule: better than ``reference`` by more than ``min_delta``."""
        if reference is None:
            return True
        delta = -self.min_delta if self.minimize else self.min_delta
        # Keras compares with keras.ops, i.e. as float32 tensors: values that differ only below
        # float32 precision are equal there, and must be here too.
        return bool(self.op(np.float32(value - delta), np.float32(reference)))

    def better(self, value: float, reference: float) -> bool:
        """Strictly better, ignoring ``min_delta`` (for ranking, e.g. top-k checkpoints)."""
        return bool(self.op(value, reference))

    def value(self, logs: Mapping[str, Any] | None) -> float | None:
        """The monitored value in ``logs``; a missing metric warns once (errors if strict)."""
        if logs is not None and self.monitor in logs:
            return float(logs[self.monitor])
        keys = sorted(logs or {})
        message = f"{self.owner}: monitor={self.monitor!r} is not in the logs"
        close = difflib.get_close_matches(self.monitor, keys, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean monitor={close[0]!r}?)"
        message += f"; available metrics: {', '.join(keys) or '(none)'}"
        if self.strict:
            raise ConfigError(message)
        if not self._warned:
            log.warning(message)
            self._warned = True
        return None

    def current(self, logs: Mapping[str, Any] | None, trainer: Any = None) -> float | None:
        """The monitored value at an epoch end, checked: a scalar, or ``None`` to skip this epoch.

        Unlike Keras (which warns and skips the epoch for ever), a monitor that names a key
        these logs will not have raises :class:`ConfigError` listing the available keys and the
        closest one (``val_acc`` -> ``val_accuracy``). Only a ``val_*`` monitor in an epoch
        that ran no validation while the run has validation (``validation_freq``) is skipped;
        where the run's validation is unknown (``model.fit``), that warns once, as Keras does.
        ``strict=True`` raises in every case. A vector value (``F1Score(average=None)``)
        raises: Keras's callbacks cannot compare one either (TF: "truth value of an array
        ... is ambiguous" at the second epoch); a one-element vector is its element.
        """
        logs = logs if logs is not None else {}
        if self.monitor not in logs:
            keys = sorted(logs)
            ran_validation = any(k.startswith("val_") for k in keys)
            has_validation = (getattr(trainer, "params", None) or {}).get("validation")
            if self.strict or ran_validation or not self.monitor.startswith("val_") or has_validation is False:
                raise ConfigError(self._missing_message(keys, has_validation is False and not ran_validation))
            if has_validation is None and not self._warned:
                log.warning(
                    f"{self.owner}: monitor={self.monitor!r} is not in the logs of this epoch (no "
                    f"validation ran); available metrics: {', '.join(keys) or '(none)'}"
                )
                self._warned = True
            return None
        value = np.asarray(logs[self.monitor])
        if value.size != 1:
            raise ConfigError(
                f"{self.owner}: monitor={self.monitor!r} is a vector of shape {value.shape} (one value per "
                "class or output), not one number; Keras's own callbacks cannot compare it either. Monitor a "
                "metric that reduces to one number, e.g. F1Score(average='macro') or its mean in a custom metric"
            )
        return float(value.reshape(()))

    def _missing_message(self, keys: list[str], no_validation: bool) -> str:
        message = f"{self.owner}: monitor={self.monitor!r} is not in the epoch logs"
        if no_validation:
            message += " (this run has no validation data: pass validation_data= or validation_split=)"
        close = difflib.get_close_matches(self.monitor, keys, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean monitor={close[0]!r}?"
        return message + f" Available keys: {', '.join(keys) or '(none)'}"


def _all_metrics(model: Any) -> list[Any]:
    found = []
    for metric in getattr(model, "metrics", None) or []:
        inner = getattr(metric, "metrics", None)
        if isinstance(inner, list):
            found.extend(inner)
        found.append(metric)
    return found
