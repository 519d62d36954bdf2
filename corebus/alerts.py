"""The alert event every notifier subscribes to."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

LEVELS = ("info", "warning", "error")


@dataclass(frozen=True)
class Alert:
    """Something a person should know about the run (see the ``on_alert`` hook)."""

    kind: str
    title: str
    text: str = ""
    level: str = "warning"
    step: int | None = None
    epoch: int | None = None
    rank: int = 0
    host: str = field(default_factory=socket.gethostname)
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Alert level {self.level!r}: use one of {', '.join(LEVELS)}")
