"""Durable, non-blocking writes: one helper for every plugin that saves files.

- :func:`atomic_path` -- write to a temporary name in the same directory, fsync, rename into
  place: a killed process never leaves a partial file under the final name.
- :class:`BackgroundWorker` -- run writes off the training thread, at most ``max_pending`` in
  flight; errors are kept and re-raised on :meth:`~BackgroundWorker.flush` so nothing is lost
  silently.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or every file of a directory, then the directory entry itself."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync it and rename it into place.

    The temporary name keeps the final suffix (Keras picks the format from it). On error the
    temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Keras picks the format from the ending, and weights files must end in ".weights.h5".
    keep = ".weights.h5" if final.name.endswith(".weights.h5") else final.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name[: -len(keep) or None]}.", suffix=".tmp" + keep, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # writers (Keras, h5py) create the file themselves
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def lower_thread_priority(niceness: int = 10) -> None:
    """Make the calling thread yield the CPU to the training threads (Linux: per-thread nice).

    Background writers and loggers are throughput work; on a small machine they would
    otherwise take cores from the step in flight.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def check_writable(directory: str | os.PathLike, owner: str) -> None:
    """Fail before training if ``directory`` cannot be created or written."""
    from .errors import ConfigError

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".corebus-write-test."):
            pass
    except OSError as exc:
        raise ConfigError(f"{owner}: cannot write to {str(directory)!r}: {exc.strerror or exc}") from exc


class BackgroundWorker:
    """One daemon thread running submitted jobs in order; ``submit`` blocks only when
    ``max_pending`` jobs are already waiting (bounded memory, bounded staleness)."""

    def __init__(self, name: str, max_pending: int = 1):
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=f"corebus-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lower_thread_priority()
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                job()
            except BaseException as exc:  # kept and re-raised on flush
                self._errors.append(exc)
            finally:
                self._jobs.task_done()

    def submit(self, job: Callable[[], Any]) -> None:
        self.raise_errors()
        self._jobs.put(job)

    def flush(self) -> None:
        """Wait for every submitted job; re-raise the first error one of them hit."""
        self._jobs.join()
        self.raise_errors()

    def raise_errors(self) -> None:
        if self._errors:
            error = self._errors.pop(0)
            self._errors.clear()
            raise error

    def close(self) -> None:
        """Finish pending jobs and stop the thread (even when a job failed: that re-raises)."""
        try:
            self.flush()
        finally:
            self._jobs.put(None)
            self._thread.join(timeout=30)
