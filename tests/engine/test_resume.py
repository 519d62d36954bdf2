"""Exact resume: real subprocesses killed with SIGKILL, restarted, compared to an uninterrupted run.

CPU training here is made bit-deterministic with ``tf.config.experimental.enable_op_determinism()``
(set in the worker), so the comparison is exact equality.
"""

import json
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import corebus
from corebus import ConfigError, RunSnapshot, SnapshotError
from corebus.testing import make_trainer, tiny_data, tiny_model

WORKER = Path(__file__).parents[1] / "workers" / "resume_worker.py"
STEPS = 6 * 12  # 6 epochs of 12 steps
KILL_POINTS = sorted(random.Random(2026).sample(range(2, STEPS), 4)) + [24]  # 24: right at an epoch end


def run_worker(out, *args):
    return subprocess.run([sys.executable, str(WORKER), str(out), *args], capture_output=True, text=True, timeout=600)


def final(out):
    arrays = np.load(Path(out) / "final.npz")
    return [arrays[k] for k in sorted(arrays.files, key=lambda k: int(k.split("_")[1]))], json.loads(
        Path(out, "final.json").read_text()
    )


def scenario(tmp, name, kill_args, mode="engine"):
    out = tmp / name
    killed = run_worker(out, "--mode", mode, *kill_args)
    resumed = run_worker(out, "--mode", mode)
    return name, killed, resumed, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    jobs = [("uninterrupted", [], "engine"), ("keras_uninterrupted", [], "keras")]
    jobs += [(f"kill_{k}", ["--kill-at-step", str(k)], "engine") for k in KILL_POINTS]
    jobs += [("kill_during_write", ["--kill-during-write", "3"], "engine")]
    jobs += [("keras_kill_30", ["--kill-at-step", "30"], "keras")]

    def go(job):
        name, args, mode = job
        if not args:
            out = tmp / name
            return name, None, run_worker(out, "--mode", mode), out
        return scenario(tmp, name, args, mode)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {name: (killed, resumed, out) for name, killed, resumed, out in pool.map(go, jobs)}


def assert_same_run(runs, name, reference="uninterrupted"):
    killed, resumed, out = runs[name]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights, states = final(out)
    ref_weights, ref_states = final(runs[reference][2])
    assert len(weights) == len(ref_weights)
    for a, b in zip(weights, ref_weights):
        np.testing.assert_array_equal(a, b)
    assert states == ref_states  # EarlyStopping, ReduceLROnPlateau, LR per step, History


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sigkill_at_any_step_resumes_to_identical_weights(runs, kill_at):
    assert runs["uninterrupted"][1].returncode == 0, runs["uninterrupted"][1].stderr[-3000:]
    _, states = final(runs["uninterrupted"][2])
    assert {"EarlyStopping", "ReduceLROnPlateau", "LRSchedule", "StepTrace", "history"} <= set(states)
    assert len(set(states["StepTrace"]["lrs"].values())) > 10  # the schedule moves the LR every step
    assert len(states["StepTrace"]["lrs"]) > 20
    assert_same_run(runs, f"kill_{kill_at}")


@pytest.mark.slow
def test_sigkill_while_a_snapshot_is_written_keeps_the_previous_one(runs):
    killed, _, out = runs["kill_during_write"]
    assert killed.returncode == -signal.SIGKILL
    assert_same_run(runs, "kill_during_write")


@pytest.mark.slow
def test_model_fit_resumes_per_epoch_exactly(runs):
    # model.fit restarts an epoch from its first batch; with snapshots at epoch ends (and
    # shuffle=False, as Keras's own shuffle order is not resumable) the result is exact.
    assert_same_run(runs, "keras_kill_30", reference="keras_uninterrupted")


def test_a_capture_keeps_its_values_while_training_goes_on(tmp_path):
    """A background write reads the captured arrays while the next steps update the variables:
    each array must be the run's state at the capture, in memory of its own."""
    x, y = tiny_data()
    trainer = make_trainer()
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    snapshot = RunSnapshot.capture(trainer)
    at_capture = {name: array.copy() for name, array in snapshot.arrays.items()}
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    moved = [
        name
        for name, array in at_capture.items()
        if name.startswith("model/")
        and not np.array_equal(array, np.asarray(trainer._state_variables()["model"][int(name.split("/")[1])].numpy()))
    ]
    assert moved  # training changed the weights after the capture ...
    for name, array in snapshot.arrays.items():  # ... and the capture still holds the old values
        np.testing.assert_array_equal(array, at_capture[name], err_msg=name)
    assert len({id(a) for a in snapshot.arrays.values()}) == len(snapshot.arrays)


def test_snapshot_from_another_model_is_refused_and_kept(tmp_path):
    x, y = tiny_data()
    trainer = make_trainer()
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = RunSnapshot.capture(trainer).write(tmp_path / "backup")
    before = sorted(p.name for p in path.iterdir())
    from corebus.plugins import BackupAndRestore

    other = make_trainer([BackupAndRestore(str(tmp_path / "backup"))], model=tiny_model(hidden=5))
    with pytest.raises(
        SnapshotError, match=r"different setup: model variable 0 .* shape \[4, 8\] in the snapshot but \[4, 5\] here"
    ):
        other.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert sorted(p.name for p in path.iterdir()) == before


def test_corrupt_snapshot_is_named_and_the_previous_one_used(tmp_path, caplog):
    x, y = tiny_data()
    trainer = make_trainer()
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    first = RunSnapshot.capture(trainer).write(tmp_path)
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    second = RunSnapshot.capture(trainer).write(tmp_path)
    data = (second / "arrays.npz").read_bytes()
    (second / "arrays.npz").write_bytes(data[: len(data) // 2])  # truncated
    loaded = RunSnapshot.latest(tmp_path)
    assert loaded.path == first and loaded.micro_step == 3
    assert f"{second / 'arrays.npz'} is corrupt or truncated" in caplog.text
    (first / "state.json").write_text("{")
    with pytest.raises(SnapshotError, match="no usable snapshot.*state.json is corrupt"):
        RunSnapshot.latest(tmp_path)


def test_snapshot_round_trip_in_process_continues_exactly(tmp_path):
    """Crash mid-epoch, restore into a fresh trainer, finish: the same as a straight run."""
    from corebus.plugins import BackupAndRestore

    x, y = tiny_data()
    straight = make_trainer(optimizer="adam")
    straight.fit(x, y, batch_size=16, epochs=3, verbose=0)

    class CrashAt9:
        @corebus.hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 9:
                raise RuntimeError("power cut")

    backup = tmp_path / "b"
    first = make_trainer([BackupAndRestore(str(backup), save_freq=4, background=False), CrashAt9()], optimizer="adam")
    with pytest.raises(corebus.PluginError, match="power cut"):
        first.fit(x, y, batch_size=16, epochs=3, verbose=0)
    # steps 4, 6 (epoch end) and 8 were snapshotted; the two newest are kept
    assert sorted(p.name for p in backup.glob("snapshot-*")) == ["snapshot-000000000006", "snapshot-000000000008"]
    resumed = make_trainer([BackupAndRestore(str(backup), background=False)], optimizer="adam")
    history = resumed.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert history.epoch == [0, 1, 2] and resumed.global_step == straight.global_step == 18
    for a, b in zip(resumed.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not list(backup.glob("snapshot-*"))  # delete_checkpoint after a normal end


def test_unwritable_backup_dir_fails_before_training(tmp_path):
    from corebus.plugins import BackupAndRestore

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    x, y = tiny_data()
    trainer = make_trainer([BackupAndRestore(str(blocker / "backup"))])
    with pytest.raises(Exception, match="cannot write to"):
        trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert trainer.global_step == 0
    with pytest.raises(ConfigError, match="save_freq"):
        BackupAndRestore(str(tmp_path), save_freq=0)
