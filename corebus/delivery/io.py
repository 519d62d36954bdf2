"""Durable, non-blocking writes: one helper for every plugin that saves files.

- :func:`atomic_path` -- write to a temporary name in the same directory, fsync, rename into
  place: a killed process never leaves a partial file under the final name.
- :class:`BackgroundWorker` -- run writes off the training thread, at most ``max_pending`` in
  flight; errors are kept and re-raised on :meth:`~BackgroundWorker.flush` so nothing is lost
  silently.
- :class:`RunLock` -- one run owns a directory or file: an OS lock (``filelock``) held for the
  run, with a sidecar naming the holder.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from corebus.delivery.storage import check_remote_writable, is_remote, remove, upload

log = logging.getLogger("corebus")


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
    temporary file is removed and ``final`` is untouched. A storage URL (``s3://...``) is staged
    in a local temporary file and uploaded in one PUT: readers see the whole object or none.
    """
    if is_remote(final):
        staging = Path(tempfile.mkdtemp(prefix="corebus-upload-"))
        try:
            tmp = staging / os.fspath(final).rsplit("/", 1)[-1]
            yield tmp
            upload(tmp, os.fspath(final))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Keras picks the format from the ending, and weights files must end in ".weights.h5".
    keep = ".weights.h5" if final.name.endswith(".weights.h5") else final.suffix
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name[: -len(keep) or None]}.", suffix=".tmp" + keep, dir=final.parent
    )
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


def delete_path(path: str | os.PathLike) -> None:
    """Delete a file, or the object a storage URL names; a missing one is no error."""
    if is_remote(path):
        remove(os.fspath(path))
    else:
        Path(path).unlink(missing_ok=True)


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
    """Fail before training if ``directory`` cannot be created or written (a storage URL: if no
    object can be written under it, see :func:`corebus.kit.check_remote_writable`)."""
    from corebus.errors import ConfigError

    if is_remote(directory):
        check_remote_writable(os.fspath(directory), owner)
        return

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
        # A process that ends on an uncaught error (model.fit has no exception hook) would kill
        # the daemon thread mid-write: the interpreter's exit waits for the pending jobs first.
        atexit.register(self._finish_at_exit)

    def _finish_at_exit(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self._jobs.unfinished_tasks and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

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
            atexit.unregister(self._finish_at_exit)
            self._jobs.put(None)
            self._thread.join(timeout=30)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# Locks this process holds, by lock file: plugins of one run may share a directory (a best and a
# last ModelCheckpoint, a backup_dir beside them), so a second holder in the process shares it.
_HELD: dict[str, list[Any]] = {}
_HELD_GUARD = threading.Lock()


class RunLock:
    """One run owns ``target`` (a directory, or a file) while it trains.

    The lock is an OS file lock taken with ``filelock`` (released by the kernel when the process
    dies, even by SIGKILL); a sidecar ``<lock>.owner`` names the holder (host, pid, plugin, start
    time) for the message a second run gets. A sidecar left by a process that died is taken over
    with a warning. Within one process the lock is shared by every holder of the same target.

    :param target: the directory (locked through ``<dir>/.corebus-run.lock``) or the file
        (``.<name>.lock`` beside it) the run writes.
    :param owner: who locks it, for messages (``"BackupAndRestore"``).
    :param directory: whether ``target`` is a directory (it need not exist yet).
    """

    def __init__(self, target: str | os.PathLike, owner: str, directory: bool = True):
        self.target: Path | str = os.fspath(target) if is_remote(target) else Path(target)
        self.owner = owner
        if isinstance(self.target, str):
            # An object store has no lock: the lock file is local, named for the URL, so two runs
            # on this host never share one prefix (runs on other hosts must use their own).
            name = hashlib.sha256(os.fspath(target).encode()).hexdigest()[:24]
            self.path = Path(tempfile.gettempdir()) / "corebus-locks" / f"{name}.lock"
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif directory:
            self.path = Path(target) / ".corebus-run.lock"
        else:
            self.path = Path(target).parent / f".{Path(target).name}.lock"
        self.sidecar = self.path.with_name(self.path.name + ".owner")
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise :class:`corebus.ConfigError` naming the run that holds it."""
        import filelock

        from corebus.errors import ConfigError

        if self.held:
            return
        key = os.path.abspath(self.path)
        with _HELD_GUARD:
            shared = _HELD.get(key)
            if shared is not None:
                shared[1] += 1
                self.held = True
                return
            lock = filelock.FileLock(key, timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise ConfigError(
                    f"{self.owner}: {str(self.target)!r} is used by another run ({self._describe(self._holder())}); "
                    "wait for that run to end (or stop it), or give this run its own directory"
                ) from None
            except OSError as exc:
                raise ConfigError(f"{self.owner}: cannot lock {str(self.target)!r}: {exc.strerror or exc}") from exc
            _HELD[key] = [lock, 1]
        self.held = True
        left = self._holder()
        if left and left.get("pid") != os.getpid():
            dead = left.get("host") == socket.gethostname() and not _pid_alive(int(left.get("pid", 0)))
            log.warning(
                "%s: taking over %s from %s, which %s",
                self.owner,
                self.target,
                self._describe(left),
                "is no longer running" if dead else "no longer holds its lock",
            )
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "owner": self.owner,
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        with atomic_path(self.sidecar) as tmp:
            tmp.write_text(json.dumps(record), encoding="utf-8")

    def release(self) -> None:
        """Give the lock back; the last holder in the process removes the lock and its sidecar."""
        if not self.held:
            return
        self.held = False
        key = os.path.abspath(self.path)
        with _HELD_GUARD:
            shared = _HELD.get(key)
            if shared is None:
                return
            shared[1] -= 1
            if shared[1] > 0:
                return
            del _HELD[key]
            with contextlib.suppress(OSError):
                self.sidecar.unlink()
            with contextlib.suppress(OSError):  # removed while held: a later run locks a new file
                self.path.unlink()
            shared[0].release()

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _describe(holder: dict[str, Any] | None) -> str:
        if not holder:
            return "holder not recorded yet"
        return (
            f"{holder.get('owner', '?')} on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('since', '?')}"
        )
