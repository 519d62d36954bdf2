"""Alerts to the ``logging`` module (and optionally a JSONL file): the notifier that needs nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from corebus import Alert, AlertOutbox, check_writable, hookimpl

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class AlertLog:
    """Write every alert to the ``corebus.alerts`` logger (and to ``path`` as JSON lines).

    The record is handed to a :class:`corebus.LogSink` worker, so a slow log handler (a file on
    a network disk, a remote syslog) never delays the thread that raised the alert, be it the
    training thread or the stall watchdog.

    :param logger: logger name.
    :param min_level: ``"info"``, ``"warning"`` or ``"error"``: alerts below it are skipped.
    :param path: also append each alert, with its details, as one JSON line to this file.
    """

    error_policy = "warn"  # a notifier must never stop training

    def __init__(self, logger: str = "corebus.alerts", min_level: str = "info", path: str | None = None):
        self._outbox = AlertOutbox("alert_log", self._write, min_level, owner="AlertLog")
        if path is not None:
            check_writable(Path(path).parent, "AlertLog")
        self.logger = logger
        self.min_level = min_level
        self.path = path
        self._log = logging.getLogger(logger)

    @hookimpl
    def on_train_begin(self):
        self._outbox.open()

    @hookimpl
    def on_alert(self, alert: Alert):
        self._outbox.put(alert)

    # Last, so alerts other plugins raise in their own end hooks still go out.
    @hookimpl(trylast=True)
    def on_train_end(self):
        self.close()

    @hookimpl(trylast=True)
    def on_exception(self):
        self.close()

    def close(self, timeout: float | None = None) -> bool:
        """Write what is queued within ``timeout`` seconds (default 5)."""
        return self._outbox.close(timeout)

    def _write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            where = f"step {record['step']}" if record.get("step") is not None else "no step"
            self._log.log(
                _LEVELS[record["level"]],
                "[%s] %s (%s, %s on %s): %s",
                record["kind"],
                record["title"],
                where,
                record.get("run") or "run",
                record["host"],
                record["text"],
            )
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record, default=str) + "\n")

    def get_config(self) -> dict[str, Any]:
        return {"logger": self.logger, "min_level": self.min_level, "path": self.path}
