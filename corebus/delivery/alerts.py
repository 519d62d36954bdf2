"""The alert event every notifier subscribes to, and the one gate every alert passes.

Any plugin raises an alert with ``trainer.alert(kind, title, text, level)``; the run's
:class:`AlertGate` decides whether it goes out (deduplication, cooldown per kind) and then
calls the ``on_alert`` hook. Alerts may be raised from any thread (the stall watchdog raises
them from its own), so the gate is thread-safe and calls ``on_alert`` for one alert at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("info", "warning", "error")


def _rank_from_env() -> int:
    # Multi-worker tf.distribute names the task in TF_CONFIG; launchers such as torchrun-style
    # scripts export RANK. Read once per alert, which is rare.
    try:
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
        if "index" in task:
            return int(task["index"])
    except (ValueError, TypeError, AttributeError):
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class Alert:
    """Something a person should know about the run (see the ``on_alert`` hook).

    ``text`` is what a chat message shows; ``details`` is the long form (e.g. every thread's
    stack on a stall) for logs and generic JSON receivers. ``resolves`` names the kind of an
    earlier alert this one closes (e.g. ``"stall"`` for "training resumed").
    """

    kind: str
    title: str
    text: str = ""
    level: str = "warning"
    step: int | None = None
    epoch: int | None = None
    rank: int = field(default_factory=_rank_from_env)
    host: str = field(default_factory=socket.gethostname)
    time: float = field(default_factory=time.time)
    run: str = ""
    details: str = ""
    resolves: str | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Alert level {self.level!r}: use one of {', '.join(LEVELS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AlertGate:
    """Deduplication and a cooldown per alert kind, shared by every plugin of a run.

    - **duplicate**: an alert of the same kind for the same step as the last one sent (two
      plugins noticing the same NaN) is dropped;
    - **cooldown**: after an alert of a kind is sent, more of that kind are held back for
      ``cooldown`` seconds (``cooldowns[kind]`` overrides it; 0 disables); the next one sent
      says how many were held back;
    - **resolutions** (``resolves="stall"``) skip the cooldown but go out only when the alert
      they resolve went out, so a receiver never sees "resumed" for a stall it was not told of.

    State (:meth:`state_dict`) is wall-clock based and JSON-safe, so a resumed run keeps its
    cooldowns. One gate per run context: ``AlertGate.of(trainer)``.
    """

    def __init__(self, cooldown: float = 300.0, cooldowns: dict[str, float] | None = None):
        self.cooldown = float(cooldown)
        self.cooldowns: dict[str, float] = dict(cooldowns or {})
        self.last_sent: dict[str, float] = {}
        self.last_step: dict[str, int | None] = {}
        self.suppressed: dict[str, int] = {}
        self.open: set[str] = set()
        # Re-entrant: a subscriber may itself raise an alert from on_alert.
        self._lock = threading.RLock()

    _create_lock = threading.Lock()

    @classmethod
    def of(cls, trainer: Any) -> "AlertGate":
        """The gate of ``trainer`` (a run context), created on first use."""
        gate = trainer.__dict__.get("alert_gate")
        if gate is None:
            with cls._create_lock:  # the watchdog and the training thread may race here
                gate = trainer.__dict__.get("alert_gate")
                if gate is None:
                    gate = trainer.alert_gate = cls()
        return gate

    def set_cooldown(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.cooldowns[kind] = float(seconds)

    def admit(self, alert: Alert, now: float | None = None) -> Alert | None:
        """The alert to send (possibly annotated), or ``None`` when it is held back."""
        now = time.time() if now is None else now
        with self._lock:
            kind = alert.kind
            if alert.resolves is not None:
                if alert.resolves not in self.open:
                    return None
                self.open.discard(alert.resolves)
                return alert
            if kind in self.last_sent and self.last_step.get(kind) == alert.step and alert.step is not None:
                return None
            cooldown = self.cooldowns.get(kind, self.cooldown)
            if kind in self.last_sent and now - self.last_sent[kind] < cooldown:
                self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
                return None
            held = self.suppressed.pop(kind, 0)
            self.last_sent[kind] = now
            self.last_step[kind] = alert.step
            self.open.add(kind)
            if held:
                plural = "s" if held > 1 else ""
                note = f"({held} more '{kind}' alert{plural} held back by the cooldown since the last one)"
                alert = dataclasses.replace(alert, text=f"{alert.text}\n{note}" if alert.text else note)
            return alert

    def dispatch(self, trainer: Any, alert: Alert) -> Alert | None:
        """Admit ``alert`` and call ``on_alert``; returns what was sent or ``None``.

        Subscribers are called one alert at a time, in order, whichever thread raised it;
        they must not block (notifiers hand the alert to their own sender thread).
        """
        with self._lock:
            sent = self.admit(alert)
            if sent is not None:
                trainer.bus.call("on_alert", trainer=trainer, alert=sent)
            return sent

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "last_sent": dict(self.last_sent),
                "last_step": dict(self.last_step),
                "suppressed": dict(self.suppressed),
                "open": sorted(self.open),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.last_sent = {k: float(v) for k, v in state.get("last_sent", {}).items()}
            self.last_step = {k: (None if v is None else int(v)) for k, v in state.get("last_step", {}).items()}
            self.suppressed = {k: int(v) for k, v in state.get("suppressed", {}).items()}
            self.open = set(state.get("open", []))


class AlertOutbox:
    """What every notifier shares: a level filter and a :class:`corebus.LogSink` worker that
    delivers alerts off the thread that raised them (the training thread or the watchdog).

    The sink opens at the first alert (or at :meth:`open`, e.g. in ``on_train_begin``) and
    :meth:`close` drains it for at most ``shutdown_timeout`` seconds. A notifier plugin keeps
    one, puts alerts in from ``on_alert`` and closes it from its last end hook.
    """

    def __init__(self, name: str, deliver: Any, min_level: str = "info", owner: str = "notifier", **sink_options: Any):
        from corebus.errors import ConfigError

        if min_level not in LEVELS:
            raise ConfigError(f"{owner}: min_level={min_level!r}; use one of {', '.join(LEVELS)}")
        self.name, self.min_level = name, min_level
        self._deliver = deliver
        self._options = {"batch_size": 1, "flush_interval": 0.1, "shutdown_timeout": 5.0, **sink_options}
        self._sink: Any = None
        self._lock = threading.Lock()

    def open(self) -> None:
        from corebus.delivery.sinks import LogSink

        with self._lock:  # the watchdog thread may deliver the first alert
            if self._sink is None:
                self._sink = LogSink(self.name, self._deliver, **self._options)

    def put(self, alert: Alert) -> None:
        """Queue ``alert`` (a dict of its fields) unless it is below ``min_level``; never blocks."""
        if LEVELS.index(alert.level) < LEVELS.index(self.min_level):
            return
        self.open()
        self._sink.put(alert.to_dict())

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is queued within ``timeout`` (default: the sink's shutdown_timeout)."""
        with self._lock:
            sink, self._sink = self._sink, None
        return True if sink is None else sink.close(timeout)
