"""A logger's backend client in a child process, so its CPU work never holds the training
loop's interpreter lock.

Some backends do all their storage work in Python inside the client: MLflow's local sqlite
store spends about 0.4 ms of CPU per metric point in SQLAlchemy, and W&B builds a protobuf
record per history row. On a sink's worker thread that work takes the interpreter lock
from the training loop between steps. :class:`BackendProcess` runs the client in a separate
interpreter at lower CPU priority instead; the sink's worker thread only pickles records
into a pipe and waits for the answer (without the lock).

The child is a fresh interpreter that imports only this module and the backend's (with the
parent's ``sys.path``); multiprocessing's "spawn" would re-run the user's main module when it
has no ``if __name__ == "__main__"`` guard, and a training script would train again in the
child. Its stdout and stderr are the parent's, so what the SDK prints still shows.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger("corebus")

_HEADER = struct.Struct("<Q")


class BackendError(RuntimeError):
    """An exception raised by the backend in the child (or the child's death), with the
    original's type name and message, and its ``retry_after`` when it had one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class BackendProcess:
    """``factory(*args, **kwargs)`` built in a child process; :meth:`call` runs its methods there.

    :param factory: a class or function importable by module and qualified name.
    :param niceness: how much lower the child's CPU priority is once its first call is done
        (``nice``, for its session too; on Linux the ``SCHED_BATCH`` policy as well). Start-up
        runs at normal priority, so the SDK is up within seconds on a busy machine.

    The child starts on the first :meth:`call` (from the sink's worker thread, so the import
    of the SDK costs the training thread nothing) and again after it died. Arguments,
    results and exceptions travel pickled; an exception comes back as :class:`BackendError`.
    """

    def __init__(self, factory: Any, *args: Any, niceness: int = 10, **kwargs: Any):
        self._target = (factory.__module__, factory.__qualname__, args, kwargs)
        self.niceness = niceness
        self._process: subprocess.Popen | None = None
        self._to_child = self._from_child = -1
        self._lock = threading.Lock()  # one call at a time
        self._state_lock = threading.Lock()  # start/stop, also from close() while a call is stuck

    def call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._stop(kill=False)  # a child that died: its pipes go too
                self._start()
            try:
                _write(self._to_child, (method, args))
                status, value = _read(self._from_child)
            except (OSError, EOFError) as exc:
                self._stop(kill=True)
                raise BackendError(f"the backend process exited ({exc or type(exc).__name__})") from None
        if status == "error":
            raise BackendError(value["message"], value.get("retry_after"))
        return value

    def close(self, timeout: float = 5.0) -> None:
        """Ask the child to finish, and kill it when it has not within ``timeout`` seconds."""
        process = self._process
        if process is None:
            return
        try:
            _write(self._to_child, None)
        except (OSError, ValueError):
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("backend process %s did not exit within %.0f s; killed", process.pid, timeout)
        # A call stuck on the other side (a hung backend) gets EOF and returns.
        self._stop(kill=True)

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            # Its own session: a Ctrl-C meant for training must not kill the writer of the
            # run's final status; it exits when the parent closes the pipe or dies.
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from corebus.delivery.backend_process import main; main()",
                    str(to_child_r),
                    str(from_child_w),
                    str(self.niceness),
                ],
                pass_fds=(to_child_r, from_child_w),
                close_fds=True,
                start_new_session=True,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._to_child, self._from_child = to_child_w, from_child_r
        _write(self._to_child, (list(sys.path), list(sys.argv), *self._target))
        status, value = _read(self._from_child)
        if status == "error":
            self._stop(kill=True)
            raise BackendError(value["message"], value.get("retry_after"))

    def _stop(self, kill: bool) -> None:
        with self._state_lock:
            process, self._process = self._process, None
            if process is not None:
                if kill and process.poll() is None:
                    process.kill()  # first: a call blocked reading the pipe gets EOF
                process.wait()
            for fd in (self._to_child, self._from_child):
                if fd >= 0:
                    os.close(fd)
            self._to_child = self._from_child = -1


class InProcessBackend:
    """:class:`BackendProcess`'s interface over an object in this process, for a backend that
    need not move (a tracking server, a test patching the SDK): callers never branch on where
    it lives. Exceptions are the backend's own."""

    def __init__(self, backend: Any):
        self.backend = backend

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.backend, method)(*args)

    def close(self, timeout: float = 5.0) -> None:
        """Nothing to stop."""


def _write(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read(fd: int) -> Any:
    return pickle.loads(_read_exactly(fd, _HEADER.unpack(_read_exactly(fd, _HEADER.size))[0]))


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _error(exc: BaseException) -> tuple[str, dict[str, Any]]:
    retry_after = getattr(exc, "retry_after", None)
    if not isinstance(retry_after, (int, float)) or isinstance(retry_after, bool):
        retry_after = None
    return "error", {"message": f"{type(exc).__name__}: {exc}", "retry_after": retry_after}


def _serve(read_fd: int, write_fd: int, niceness: int) -> None:
    """The child: build the target, then answer calls until told to stop (or the parent dies).

    Start-up (imports, the backend's construction, its first call: an SDK's lazy imports, a
    run's creation) runs at normal priority, so the backend is up within seconds even while
    training keeps every core busy; after that the child yields the CPU (``niceness``).
    """
    try:
        # What the backend sees of its process is the training program's: sys.path (to import
        # the backend), sys.argv (SDKs record the command line).
        sys.path[:], sys.argv[:], module, qualname, args, kwargs = _read(read_fd)
        target: Any = importlib.import_module(module)
        for name in qualname.split("."):
            target = getattr(target, name)
        backend = target(*args, **kwargs)
    except BaseException as exc:  # reported to the parent, which raises it on its side
        _write(write_fd, _error(exc))
        return
    _write(write_fd, ("ok", None))
    yielded = False
    while True:
        try:
            message = _read(read_fd)
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        method, args = message
        try:
            reply = ("ok", getattr(backend, method)(*args))
        except BaseException as exc:
            reply = _error(exc)
        _write(write_fd, reply)
        if not yielded:
            _yield_cpu(niceness)
            yielded = True


def main() -> None:
    """The child's entry point: ``<read fd> <write fd> <niceness>`` in ``sys.argv``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this ends
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))


def _yield_cpu(niceness: int) -> None:
    """From now on, take the CPU only when training leaves it."""
    try:
        os.nice(niceness)
        # Batch scheduling: waking up for a record never preempts a training thread (the
        # kernel otherwise favours a task that just woke), the cost that matters to a loop of
        # millisecond steps.
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the niceness alone
        pass
    _lower_session_priority(os.nice(0))


def _lower_session_priority(niceness: int) -> None:
    """Give this process's session the niceness of the process.

    The child leads a session of its own, and where Linux groups tasks by session for CPU
    shares ("autogroup", on by default in most desktop and cloud kernels) the two sessions
    share a contended core half and half: a process's own niceness only ranks it within its
    session. The session's niceness ranks it against the training program's. The kernel takes
    at most ten such changes a second from all unprivileged processes together, so a busy
    moment (several children starting) is retried for a second.
    """
    path = "/proc/self/autogroup"
    if not _in_autogroup(path):
        return
    for _ in range(11):
        try:
            with open(path, "w") as handle:
                handle.write(str(niceness))
            return
        except BlockingIOError:  # EAGAIN: another process changed a session's niceness just now
            time.sleep(0.1)
        except OSError:  # not permitted here: the process's own niceness still applies within
            return


def _in_autogroup(path: str) -> bool:
    """Whether this process's session has an autogroup of its own, whose niceness ranks it.

    The file (``path``: ``/proc/self/autogroup``) is missing outside Linux, and reads empty in
    the kernel's default group: autogroup off, or a session started before it was on (seen
    under a CI runner), where the process's own niceness is what ranks it.
    """
    try:
        with open(path) as handle:
            return bool(handle.read().strip())
    except OSError:
        return False
