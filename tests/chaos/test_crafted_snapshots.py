"""A snapshot is data, never instructions: crafted or malformed snapshots are unusable, no file
outside the run is touched, and the newest usable snapshot is taken, with a warning."""

import hashlib
import json
import logging

import pytest

import corebus
from corebus import RunSnapshot, SnapshotError, hookimpl
from corebus.plugins import BackupAndRestore, ModelCheckpoint
from corebus.testing import make_trainer, tiny_data

FIT = dict(batch_size=16, verbose=0)


class CrashAfterEpoch1:
    @hookimpl
    def on_epoch_begin(self, epoch):
        if epoch == 2:
            raise RuntimeError("power cut")


def plugins(tmp_path):
    return [
        ModelCheckpoint(
            str(tmp_path / "ckpt" / "{epoch}.weights.h5"), monitor="loss", save_weights_only=True, save_top_k=1
        ),
        BackupAndRestore(str(tmp_path / "backup"), background=False),
    ]


@pytest.fixture
def interrupted(tmp_path):
    """A run killed after epoch 1: snapshots of steps 6 and 12 in the backup directory."""
    x, y = tiny_data()
    with pytest.raises(corebus.PluginError, match="power cut"):
        make_trainer(plugins(tmp_path) + [CrashAfterEpoch1()]).fit(x, y, epochs=4, **FIT)
    snapshots = sorted((tmp_path / "backup").glob("snapshot-*"))
    assert [p.name for p in snapshots] == ["snapshot-000000000006", "snapshot-000000000012"]
    return snapshots[-1]


def rehash(snapshot):
    """What a crafter does: the manifest's checksums recomputed for the edited files."""
    manifest = json.loads((snapshot / "manifest.json").read_text())
    manifest["files"] = {f: hashlib.sha256((snapshot / f).read_bytes()).hexdigest() for f in manifest["files"]}
    (snapshot / "manifest.json").write_text(json.dumps(manifest))


def resume(tmp_path, caplog):
    x, y = tiny_data()
    restored = []

    class Restored:
        @hookimpl
        def on_state_restored(self, step):
            restored.append(step)

    with caplog.at_level(logging.WARNING, logger="corebus"):
        make_trainer(plugins(tmp_path) + [Restored()]).fit(x, y, epochs=4, **FIT)
    return restored


def test_a_top_k_path_outside_the_checkpoint_directory_is_refused_and_never_touched(tmp_path, interrupted, caplog):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    state = json.loads((interrupted / "state.json").read_text())
    checkpoint = next(name for name in state["plugins"] if "top_k" in state["plugins"][name])
    # a value so bad that the next save pushes it out of the top 1, and the file would be unlinked
    state["plugins"][checkpoint]["top_k"] = [[str(victim), 1e9]]
    (interrupted / "state.json").write_text(json.dumps(state))
    rehash(interrupted)
    restored = resume(tmp_path, caplog)
    assert restored == [6]  # the newest snapshot was refused before any plugin reacted to it
    assert victim.read_text() == "precious"
    assert "outside this checkpoint's directory" in caplog.text and str(victim) in caplog.text
    assert f"skipping unusable snapshot: {interrupted}" in caplog.text


@pytest.mark.parametrize(
    "craft",
    ["dotdot_name", "absolute_name", "empty_files", "manifest_json", "state_json", "wrong_type", "missing_file"],
)
def test_a_malformed_newest_snapshot_falls_back_to_the_previous_one(tmp_path, interrupted, caplog, craft):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    manifest_file = interrupted / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    if craft == "dotdot_name":
        manifest["files"]["../../outside.json"] = digest
    elif craft == "absolute_name":
        manifest["files"] = {str(outside): digest, "arrays.npz": manifest["files"]["arrays.npz"]}
    elif craft == "empty_files":
        manifest["files"] = {}
        (interrupted / "arrays.npz").write_bytes(b"PK\x03\x04 damaged")
    elif craft == "manifest_json":
        manifest = None
        manifest_file.write_text('{"files": ')
    elif craft == "state_json":
        (interrupted / "state.json").write_text('{"format": 1, ')
        rehash(interrupted)
        manifest = None
    elif craft == "wrong_type":
        state = json.loads((interrupted / "state.json").read_text())
        state["micro_step"] = "12; rm -rf /"
        (interrupted / "state.json").write_text(json.dumps(state))
        rehash(interrupted)
        manifest = None
    elif craft == "missing_file":
        (interrupted / "arrays.npz").unlink()
    if manifest is not None:
        manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError):
        RunSnapshot.load(interrupted)  # one clear error type, never a raw BadZipFile / KeyError
    assert resume(tmp_path, caplog) == [6]
    assert "skipping unusable snapshot: snapshot" in caplog.text and str(interrupted) in caplog.text
    assert outside.read_text() == "{}"


def test_temporary_files_of_dead_writers_are_removed_at_the_next_start(tmp_path, interrupted, caplog):
    dead_snapshot = tmp_path / "backup" / ".tmp-snapshot-000000000018-999999"
    dead_snapshot.mkdir()
    (dead_snapshot / "arrays.npz").write_bytes(b"partial")
    dead_save = tmp_path / "ckpt" / ".3.k2j3h4.tmp.weights.h5"
    dead_save.write_bytes(b"partial")
    resume(tmp_path, caplog)
    assert not dead_snapshot.exists() and not dead_save.exists()
    assert "left by a snapshot write that never finished" in caplog.text
    assert "left by a save that never finished" in caplog.text
