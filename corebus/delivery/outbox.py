"""One delivery path for loggers: what TensorBoard, MLflow and W&B share between their hooks
and their backend, as :class:`corebus.kit.AlertOutbox` is for notifiers.

A logger keeps only its record-to-SDK writer (``send``); the :class:`LoggerOutbox` does the rest:

- **lazy open**: the sink opens at the first record (or :meth:`LoggerOutbox.open`), not in
  ``on_train_begin``, because a snapshot restored later in that hook may still name the run
  (and so the files) to continue; records made before (:meth:`LoggerOutbox.hold`) go first;
- **spool naming**: ``<directory>/<name>.spool.jsonl``, which ``corebus sync`` finds;
- **staging**: files waiting for upload are hard-linked aside under ``<directory>/<name>.staging``;
- **snapshots**: :meth:`LoggerOutbox.flush` makes what was handed over durable, bounded in time;
- **status**: :func:`run_status` maps how training ended to FINISHED / FAILED / KILLED;
- **replay**: :meth:`LoggerOutbox.replay` delivers a spool left behind (``corebus sync``).

Batch records reach a logger already held by the engine (``on_log_steps``, every
``LOGGER_FLUSH_SECONDS``): :func:`step_points` reads them, and the logger hands them straight
to its outbox; no second buffer on the training thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corebus.bus.logs import LazyLogs, read_all
from corebus.delivery import sinks
from corebus.delivery.sinks import SPOOL_SUFFIX, LogSink, Record, Spool, replay_spool

log = logging.getLogger("corebus")

STAGING_SUFFIX = ".staging"


def run_status(exception: BaseException | None = None) -> str:
    """How a run ended, as every logger reports it: ``FINISHED`` (no exception), ``KILLED`` (a
    stop request: Ctrl-C, or a signal turned into ``SystemExit`` such as ``corebus.Preempted``)
    or ``FAILED`` (any other exception)."""
    if exception is None:
        return "FINISHED"
    return "KILLED" if isinstance(exception, (KeyboardInterrupt, SystemExit)) else "FAILED"


def scalar_values(values: Any) -> dict[str, float]:
    """A step's logged values read as floats; a value that is not a scalar (Keras lets a metric
    return a vector) is left out, as no scalar chart can show it."""
    if type(values) is LazyLogs:  # the engine's step values: floats already
        return values.to_dict()
    read = read_all(values)
    if all(type(value) is float for value in read.values()):
        return read
    out = {}
    for name, value in read.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def step_points(records: Iterable[Any], cadence: Any) -> list[tuple[int, float, dict[str, float]]]:
    """``(step, time, values)`` of the ``on_log_steps`` records at which ``cadence`` is due,
    oldest first. Read here, at hand-over: the steps are long done, so a read costs 5-20 µs
    instead of the 80-100 µs of waiting for the device right after a step's dispatch."""
    return [(record.step, record.time, scalar_values(record.logs)) for record in cadence.picks(records)]


@dataclass
class OutboxTarget:
    """What a logger opens at its first record: its writer and where undelivered records wait.

    :param send: the logger's record-to-SDK writer, called on the sink's worker thread with a
        list of records; raises on failure, all-or-nothing per call (see :class:`LogSink`).
    :param directory: where the spool and the staged files live (a local directory).
    :param name: names the spool (``<name>.spool.jsonl``) and the staging folder (``<name>.staging``).
    :param header: what ``corebus sync`` needs to rebuild the writer (``{"plugin": ..., "config": ...}``).
    :param fields: merged into every held record when they go (e.g. the run they belong to,
        known only at the open).
    :param close: called after the sink is closed (the writer's files, a child process...).
    """

    send: Callable[[list[Record]], None]
    directory: str | os.PathLike
    name: str
    header: Record
    fields: Record = field(default_factory=dict)
    close: Callable[[], None] | None = None

    @property
    def spool_path(self) -> Path:
        return Path(self.directory) / f"{self.name}{SPOOL_SUFFIX}"

    @property
    def staging(self) -> Path:
        return Path(self.directory) / f"{self.name}{STAGING_SUFFIX}"


class LoggerOutbox:
    """A logger's delivery: a :class:`LogSink` (bounded queue, worker thread, spool, retries)
    opened lazily from ``opener``, plus the snapshot flush, file staging and bounded close
    every logger needs. Records are put from the training thread and, for alerts, from a
    watchdog thread: both safe, neither ever waits on the backend.

    :param name: shown in logs and the sink's thread name.
    :param opener: called once per open (at the first record after :meth:`close`); returns the
        :class:`OutboxTarget`. Records it holds (:meth:`hold`: a run's first records) go before
        those held earlier.
    :param owner: the plugin's class name, for warnings.
    :param shutdown_timeout: how long :meth:`flush` and :meth:`close` wait for the backend.
    """

    def __init__(self, name: str, opener: Callable[[], OutboxTarget], *, owner: str, shutdown_timeout: float):
        self.name, self.owner = name, owner
        self.shutdown_timeout = float(shutdown_timeout)
        self._opener = opener
        self._target: OutboxTarget | None = None
        #: The sink of the last open; kept after :meth:`close` for its ``stats``.
        self.sink: LogSink | None = None
        self._held: list[Record] = []
        self._serial = itertools.count(1)
        # Re-entrant: the opener may hold records; the watchdog may put the first record.
        self._lock = threading.RLock()

    @property
    def is_open(self) -> bool:
        return self._target is not None

    @property
    def stats(self) -> dict[str, Any]:
        """The sink's counters (queued, sent, retries, spooled...); empty before the first open."""
        return {} if self.sink is None else self.sink.stats

    @property
    def target(self) -> OutboxTarget | None:
        return self._target

    def open(self) -> OutboxTarget:
        """Open now (a no-op when open): call the opener, start the sink, send the held records."""
        with self._lock:
            if self._target is None:
                # What the opener holds (a run's first records) goes before what was held earlier.
                earlier, self._held = self._held, []
                target = self._opener()
                spool = Spool(target.spool_path, target.header)
                # Read at each open, not at import: the constant is the engine's hand-over interval too.
                self.sink = LogSink(
                    self.name,
                    target.send,
                    spool=spool,
                    flush_interval=sinks.LOGGER_FLUSH_SECONDS,
                    shutdown_timeout=self.shutdown_timeout,
                )
                self._target = target
                held, self._held = self._held + earlier, []
                for record in held:
                    self.sink.put({**record, **target.fields})
            return self._target

    def put(self, record: Record) -> None:
        """Hand ``record`` to the sink (opening it first if needed); never blocks."""
        if self._target is None:
            self.open()
        self.sink.put(record)

    def hold(self, record: Record) -> None:
        """Send ``record`` when the outbox opens (at once when it is open): for records made
        before the run's identity is settled, e.g. in ``on_train_begin``."""
        with self._lock:
            if self._target is None:
                self._held.append(record)
                return
        self.sink.put(record)

    def flush(self) -> bool:
        """For a run snapshot: wait until every record put so far is delivered or spooled on
        disk, at most ``shutdown_timeout`` seconds, so a kill after the snapshot loses none."""
        if self._target is None:
            return True
        if self.sink.flush(self.shutdown_timeout):
            return True
        log.warning(
            "%s: records not delivered within %.0f s of a snapshot; a kill now may lose them",
            self.owner,
            self.shutdown_timeout,
        )
        return False

    def close(self) -> bool:
        """Deliver what can be delivered within ``shutdown_timeout``; the rest stays in the spool.
        Returns ``True`` when nothing is left undelivered. Held records of a run that never
        opened are dropped (there is no run to send them to)."""
        with self._lock:
            target, self._target = self._target, None
            self._held = []
        if target is None:
            return True
        try:
            return self.sink.close(self.shutdown_timeout)
        finally:
            try:
                if target.close is not None:
                    target.close()
            finally:
                _remove_if_empty(target.staging)

    def stage(self, source: str | os.PathLike | None, name: str | None = None) -> Path:
        """A private path for a file waiting for upload, in a folder of its own: a hard link to
        ``source`` (O(1), and a checkpoint rotated away before its upload still arrives), a copy
        across devices, a copied directory; or, without ``source``, a place to write ``name``."""
        staging = self.open().staging
        # The serial keeps order readable; the token keeps a resumed process clear of the
        # staged files its killed predecessor's spool still names.
        target = staging / f"{next(self._serial)}-{secrets.token_hex(4)}" / (name or Path(source).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source is not None:
            if Path(source).is_dir():
                shutil.copytree(source, target)
            else:
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)
        return target

    @staticmethod
    def replay(
        path: str | os.PathLike, send: Callable[[list[Record]], None], *, owner: str, batch_size: int = 200
    ) -> int:
        """Deliver a spool left by a run through ``send`` (``corebus sync``); returns how many
        records went. Once all went, an empty staging folder beside the spool goes too."""
        total = len(sinks.read_spool(path)[1])
        sent = replay_spool(path, send, what=owner, batch_size=batch_size)
        if sent == total:
            _remove_if_empty(Path(str(path)[: -len(SPOOL_SUFFIX)] + STAGING_SUFFIX))
        return sent


def _remove_if_empty(staging: Path) -> None:
    """The staging folder and its empty per-file folders (the writers remove what they sent)."""
    if not staging.is_dir():
        return
    for folder in staging.iterdir():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if not any(staging.iterdir()):
        staging.rmdir()


class PendingPoints:
    """Metric points ``(step, time ms, values)`` held on the training thread until a logger
    hands them to its sink: every ``interval`` seconds or ``max_points`` points.

    For a logger that takes batch records one at a time from ``on_log``. The built-in loggers
    take them from ``on_log_steps``, already held by the engine, and need no second buffer
    (:func:`step_points`). Values stay as logged until :meth:`take` reads them as floats.
    """

    def __init__(self, interval: float | None = None, max_points: int = 250):
        self.interval = sinks.LOGGER_FLUSH_SECONDS if interval is None else interval
        self.max_points = max_points
        self._points: list[tuple[int, int, Any]] = []
        # Counted from the last hand-off, so the first point, and one after a quiet spell (a
        # sparse cadence, a long validation), goes at once: add() is called only when due.
        self._handed_at = float("-inf")

    def add(self, step: int, values: Any, at: float | None = None) -> bool:
        """Hold one point (logged at ``at``, ``time.time()`` by default); ``True`` when the
        points are due for hand-off (call :meth:`take`)."""
        self._points.append((int(step), int((time.time() if at is None else at) * 1000), values))
        return len(self._points) >= self.max_points or time.monotonic() - self._handed_at >= self.interval

    def take(self) -> list[tuple[int, int, dict[str, float]]]:
        """The points held, oldest first, with values read as floats (:func:`scalar_values`)."""
        points, self._points = self._points, []
        self._handed_at = time.monotonic()
        return [(step, ms, scalar_values(values)) for step, ms, values in points]

    def __len__(self) -> int:
        return len(self._points)
