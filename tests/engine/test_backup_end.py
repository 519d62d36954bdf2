"""BackupAndRestore at the end of an epoch and of a run: the end is a commit."""

import logging

import numpy as np
import pytest

import corebus
from corebus import hookimpl
from corebus.plugins import BackupAndRestore
from corebus.testing import make_trainer, tiny_data

FIT = dict(batch_size=16, verbose=0)


class SeesSnapshots:
    """Records which snapshots exist while this plugin's on_train_end runs."""

    def __init__(self, backup_dir):
        self.backup_dir, self.seen = backup_dir, None

    @hookimpl(trylast=True)
    def on_train_end(self):
        self.seen = sorted(p.name for p in self.backup_dir.glob("snapshot-*"))


@pytest.mark.parametrize("listed", ["before", "after"])
def test_snapshots_are_deleted_after_every_other_end_hook_and_no_backup_dir_is_left(tmp_path, listed):
    backup_dir = tmp_path / "backup"
    sees = SeesSnapshots(backup_dir)
    backup = BackupAndRestore(str(backup_dir), background=False)
    x, y = tiny_data()
    make_trainer([sees, backup] if listed == "before" else [backup, sees]).fit(x, y, epochs=2, **FIT)
    assert sees.seen == ["snapshot-000000000006", "snapshot-000000000012"]  # both epoch ends, kept till here
    assert not backup_dir.exists()  # Keras's BackupAndRestore leaves no directory behind either


def test_the_report_is_written_before_the_snapshots_go(tmp_path, monkeypatch):
    from corebus.plugins.report import RunReport

    backup_dir = tmp_path / "backup"
    seen = []
    real_write = RunReport._write

    def write(self, trainer, status, error):
        seen.append(sorted(p.name for p in backup_dir.glob("snapshot-*")))
        return real_write(self, trainer, status, error)

    monkeypatch.setattr(RunReport, "_write", write)
    x, y = tiny_data()
    # backup listed first: its ordering constraint still puts its commit outside the report's
    trainer = make_trainer(
        [
            BackupAndRestore(str(backup_dir), background=False),
            RunReport(tmp_path / "report", log_every_n_steps=None, gradient_norm=False),
        ]
    )
    trainer.fit(x, y, epochs=1, **FIT)
    assert seen == [["snapshot-000000000006"]]
    assert (tmp_path / "report" / "report.json").exists() and not backup_dir.exists()


def test_a_failing_end_hook_keeps_the_snapshots(tmp_path):
    class FailsAtEnd:
        @hookimpl
        def on_train_end(self):
            raise RuntimeError("logger could not close")

    backup_dir = tmp_path / "backup"
    x, y = tiny_data()
    with pytest.raises(corebus.PluginError, match="could not close"):
        make_trainer([BackupAndRestore(str(backup_dir), background=False), FailsAtEnd()]).fit(x, y, epochs=1, **FIT)
    assert [p.name for p in backup_dir.glob("snapshot-*")] == ["snapshot-000000000006"]


@pytest.mark.parametrize("tier", ["plain", "trylast"])
def test_an_epoch_is_snapshotted_when_another_plugin_raises_at_its_end(tmp_path, tier):
    class FailsAtEpoch1:
        def on_epoch_end(self, epoch):
            if epoch == 1:
                raise RuntimeError("disk full")

    FailsAtEpoch1.on_epoch_end = hookimpl(trylast=tier == "trylast")(FailsAtEpoch1.on_epoch_end)
    backup_dir = tmp_path / "backup"
    x, y = tiny_data()
    trainer = make_trainer([BackupAndRestore(str(backup_dir), background=True), FailsAtEpoch1()])
    with pytest.raises(corebus.PluginError, match="disk full"):
        trainer.fit(x, y, epochs=3, **FIT)
    assert sorted(p.name for p in backup_dir.glob("snapshot-*")) == ["snapshot-000000000006", "snapshot-000000000012"]
    epochs = []

    class Epochs:
        @hookimpl
        def on_epoch_begin(self, epoch):
            epochs.append(epoch)

    resumed = make_trainer([BackupAndRestore(str(backup_dir), background=False), Epochs()])
    resumed.fit(x, y, epochs=3, **FIT)
    assert resumed.global_step == 18 and epochs == [2]  # epoch 1 is kept: only epoch 2 is trained


def test_a_rerun_of_a_run_killed_while_ending_trains_nothing(tmp_path, caplog):
    backup_dir = tmp_path / "backup"
    x, y = tiny_data()

    class DiesWhileEnding:
        @hookimpl
        def on_train_end(self):
            raise KeyboardInterrupt  # as a kill in the end phase: after the last epoch's snapshot

    first = make_trainer([BackupAndRestore(str(backup_dir), background=False), DiesWhileEnding()])
    with pytest.raises(KeyboardInterrupt):
        first.fit(x, y, epochs=2, **FIT)

    class CountsSteps:
        steps = 0

        @hookimpl
        def on_train_batch_end(self):
            CountsSteps.steps += 1

    rerun = make_trainer([BackupAndRestore(str(backup_dir), background=False), CountsSteps()])
    with caplog.at_level(logging.WARNING, logger="corebus"):
        rerun.fit(x, y, epochs=2, **FIT)
    assert CountsSteps.steps == 0 and rerun.global_step == 12
    assert "had finished training" in caplog.text
    for a, b in zip(rerun.model.get_weights(), first.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not backup_dir.exists()


def test_snapshot_now_at_a_step_boundary_resumes_exactly(tmp_path):
    """The engine's answer to a stop request: a snapshot of the step just finished, then exit."""
    x, y = tiny_data()
    straight = make_trainer(optimizer="adam")
    straight.fit(x, y, epochs=2, **FIT)
    backup_dir = tmp_path / "backup"
    backup = BackupAndRestore(str(backup_dir), background=True)

    class StopAt8:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 8:
                self.path = backup.snapshot_now(trainer)
                raise KeyboardInterrupt  # the process ends right after the snapshot

    stopper = StopAt8()
    with pytest.raises(KeyboardInterrupt):
        make_trainer([backup, stopper], optimizer="adam").fit(x, y, epochs=2, **FIT)
    assert stopper.path == backup_dir / "snapshot-000000000008" and (stopper.path / "manifest.json").exists()
    resumed = make_trainer([BackupAndRestore(str(backup_dir))], optimizer="adam")
    resumed.fit(x, y, epochs=2, **FIT)
    for a, b in zip(resumed.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
