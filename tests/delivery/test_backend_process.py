"""BackendProcess: a backend client living in a child process (real child processes)."""

import os
import signal
import time

import pytest

from corebus import BackendError, BackendProcess, InProcessBackend


class Recorder:
    """A stand-in backend: keeps what it is sent, in whichever process it lives."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.items = []

    def send(self, records):
        self.items += [f"{self.prefix}{r}" for r in records]
        return {"pid": os.getpid(), "items": list(self.items)}

    def fail(self, retry_after=None):
        error = ConnectionError("server said no")
        error.retry_after = retry_after
        raise error

    def hang(self):
        time.sleep(60)

    def die(self):
        os._exit(3)

    def niceness(self):
        return os.nice(0)

    def policy(self):
        return os.sched_getscheduler(0)

    def session_group(self):
        return _autogroup()


def _autogroup():
    """``(name, niceness)`` of this process's CPU-share group of sessions (Linux autogroup), or
    None outside one: no autogroup here, or the kernel's default group (the file reads empty)."""
    try:
        fields = open("/proc/self/autogroup").read().split()
    except OSError:
        return None
    if not fields:
        return None
    name, _, niceness = fields
    return name, int(niceness)


def test_calls_run_in_a_child_and_keep_its_state():
    backend = BackendProcess(Recorder, "x-")
    try:
        first = backend.call("send", [1, 2])
        second = backend.call("send", [3])
        assert first["pid"] != os.getpid()
        assert second == {"pid": first["pid"], "items": ["x-1", "x-2", "x-3"]}
        assert backend.call("niceness") == min(19, os.nice(0) + 10)  # lower priority than training
        assert backend.call("policy") == os.SCHED_BATCH  # and never preempts it on waking up
    finally:
        backend.close()


def test_the_child_starts_at_normal_priority_then_its_session_yields_too():
    """After start-up the child yields, and so does its session: it leads a session of its
    own, and where the kernel shares a core between sessions (autogroup), that session must
    rank below training's, or the child's own niceness counts for nothing against the
    training threads."""
    backend = BackendProcess(Recorder, "")
    try:
        # Start-up, the first call included, runs at training's priority: an SDK's imports
        # and a run's creation do not wait for idle CPU.
        assert backend.call("niceness") == os.nice(0)
        lowered = min(19, os.nice(0) + 10)
        assert backend.call("niceness") == lowered
        ours, childs = _autogroup(), backend.call("session_group")
        if childs is not None:  # the kernel gave the child's new session a group of its own
            assert childs[1] == lowered
            # ours is None where this process sits in the kernel's default group (a session
            # never started since boot, as under a CI runner): still a different group.
            assert ours is None or childs[0] != ours[0]
        else:  # no session groups on this kernel: the child's own niceness ranks it
            assert ours is None
    finally:
        backend.close()


def test_errors_come_back_with_their_message_and_retry_after():
    backend = BackendProcess(Recorder, "")
    try:
        with pytest.raises(BackendError, match="ConnectionError: server said no") as info:
            backend.call("fail", 2.5)
        assert info.value.retry_after == 2.5
        assert backend.call("send", ["still alive"])["items"] == ["still alive"]
    finally:
        backend.close()


def test_a_dead_child_is_an_error_and_the_next_call_starts_a_new_one():
    backend = BackendProcess(Recorder, "")
    try:
        pid = backend.call("send", ["a"])["pid"]
        with pytest.raises(BackendError, match="exited"):
            backend.call("die")
        again = backend.call("send", ["b"])
        assert again["pid"] != pid and again["items"] == ["b"]
    finally:
        backend.close()


def test_a_factory_that_fails_is_reported_and_leaves_no_child():
    backend = BackendProcess(Recorder)  # missing argument
    with pytest.raises(BackendError, match="TypeError"):
        backend.call("send", [])
    assert backend._process is None


def test_close_kills_a_hung_backend_within_its_timeout_and_unblocks_the_caller():
    import threading

    backend = BackendProcess(Recorder, "")
    backend.call("send", [])
    errors = []
    caller = threading.Thread(target=lambda: errors.append(pytest.raises(BackendError, backend.call, "hang")))
    caller.start()
    time.sleep(0.3)
    start = time.monotonic()
    backend.close(timeout=0.5)
    caller.join(5)
    assert time.monotonic() - start < 3
    assert not caller.is_alive() and errors


def test_ctrl_c_in_the_terminal_does_not_reach_the_child():
    backend = BackendProcess(Recorder, "")
    try:
        pid = backend.call("send", [])["pid"]
        assert os.getpgid(pid) != os.getpgid(0)  # its own session: the terminal's SIGINT goes elsewhere
        os.kill(pid, signal.SIGINT)  # and a stray one is ignored
        time.sleep(0.2)
        assert backend.call("send", ["after"])["pid"] == pid
    finally:
        backend.close()


def test_in_process_backend_has_the_same_interface_and_raises_the_backends_own_errors():
    backend = InProcessBackend(Recorder("x-"))
    assert backend.call("send", [1])["pid"] == os.getpid()
    with pytest.raises(ConnectionError, match="server said no") as info:
        backend.call("fail", 1.0)
    assert info.value.retry_after == 1.0
    backend.close()
    assert backend.backend.items == ["x-1"]
