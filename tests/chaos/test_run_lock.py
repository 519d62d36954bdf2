"""One run owns its directories: two real processes on one run directory, and a stale lock."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corebus import ConfigError
from corebus.plugins import BackupAndRestore, CSVLogger, ModelCheckpoint
from corebus.testing import make_trainer, tiny_data  # noqa: F401 (tiny_data: a fixture)

WORKER = Path(__file__).parents[1] / "workers" / "resume_worker.py"


def worker(out, *args, **popen):
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_for(path, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_run_on_the_same_directories_stops_before_training_and_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = worker(out, "--step-sleep", "0.3")
    try:
        wait_for(out / "backup" / ".corebus-run.lock.owner", first)
        second = worker(out)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 1
        assert "ConfigError" in err and "is used by another run" in err
        assert f"pid {first.pid}," in err and os.uname().nodename in err  # the holder, named
        assert not (out / "process.json").exists()  # the second run trained nothing
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # The killed run's locks were released by the kernel; its sidecars name a dead process.
    assert json.loads((out / "backup" / ".corebus-run.lock.owner").read_text())["pid"] == first.pid
    third = worker(out)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-3000:]
    assert f"taking over {out / 'backup'} from BackupAndRestore on host" in err
    assert f"pid {first.pid}" in err and "which is no longer running" in err
    assert json.loads((out / "process.json").read_text())["restored_step"] >= 5  # it resumed the killed run
    assert not (out / "backup").exists() and not list(out.glob(".*.lock*"))  # nothing left behind


HOLD = textwrap.dedent("""
    import sys, time
    from corebus import RunLock
    RunLock(sys.argv[1], "ModelCheckpoint").acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_checkpoint_directory_held_by_another_process_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ckpt)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        x, y = tiny_data()
        trainer = make_trainer([ModelCheckpoint(str(ckpt / "{epoch}.keras"), monitor="loss")])
        with pytest.raises(
            ConfigError,
            match=rf"ModelCheckpoint: .*ckpt' is used by another run \(ModelCheckpoint on "
            rf"host .*, pid {holder.pid}, since",
        ):
            trainer.fit(x, y, epochs=1, verbose=0)
        assert trainer.global_step == 0 and not list(ckpt.glob("*.keras"))
    finally:
        holder.kill()
        holder.wait()


def test_plugins_of_one_run_share_a_directory_and_leave_no_lock_behind(tmp_path):
    x, y = tiny_data()
    plugins = [
        ModelCheckpoint(str(tmp_path / "best.keras"), monitor="loss", save_best_only=True),
        ModelCheckpoint(str(tmp_path / "{epoch}.keras"), monitor="loss"),
        BackupAndRestore(str(tmp_path / "backup")),
        CSVLogger(tmp_path / "log.csv"),
    ]
    make_trainer(plugins).fit(x, y, epochs=2, verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.keras", "2.keras", "best.keras", "log.csv"]


def test_a_lock_is_given_back_when_training_fails(tmp_path):
    from corebus import PluginError, hookimpl

    class Fails:
        @hookimpl
        def on_train_batch_end(self):
            raise RuntimeError("boom")

    x, y = tiny_data()
    with pytest.raises(PluginError, match="boom"):
        make_trainer([CSVLogger(tmp_path / "log.csv"), ModelCheckpoint(str(tmp_path / "c" / "m.keras")), Fails()]).fit(
            x, y, epochs=1, verbose=0
        )
    assert not list(tmp_path.rglob(".*lock*"))
    # another process can take both now
    code = (
        "import sys; from corebus import RunLock; RunLock(sys.argv[1], 't', directory=False).acquire(); "
        "RunLock(sys.argv[2], 't').acquire()"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "log.csv"), str(tmp_path / "c")], check=True)
