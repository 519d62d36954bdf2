"""TensorBoardLogger with ``log_dir="s3://bucket/prefix"``, against a real S3-compatible server
(moto in server mode on 127.0.0.1): the event files are written locally, uploaded at epoch ends,
snapshots and the end of ``fit``, and read back from the store with TensorBoard's own reader."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from corebus import ConfigError, hookimpl
from corebus.integrations import TensorBoardLogger
from corebus.testing import make_trainer, tiny_data

BATCH, N = 8, 96  # 12 steps per epoch


def download(s3, bucket: str, prefix: str, into: Path) -> list[str]:
    """Every object under ``prefix`` into ``into`` (same relative names); returns their names."""
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    for key in keys:
        target = into / key[len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return sorted(key[len(prefix) :].lstrip("/") for key in keys)


def values(log_dir: Path) -> dict[tuple[str, str], dict[int, object]]:
    """``(run, tag) -> {step: value}`` of every event file under ``log_dir`` (scalars as floats,
    texts as strings), read with TensorBoard's event reader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    found: dict[tuple[str, str], dict[int, object]] = {}
    for path in sorted(log_dir.glob("*/events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name not in ("scalars", "text"):
                    continue  # the model's graph
                array = tensor_util.make_ndarray(value.tensor)
                read = array.item().decode() if array.dtype == object else float(array)
                steps = found.setdefault((path.parent.name, value.tag), {})
                assert event.step not in steps, f"{value.tag} at step {event.step} written twice"
                steps[event.step] = read
    return found


class StoreWatcher:
    """At the start of epoch 1: whether epoch 0's records reached the store on their own (the
    writer thread's upload at the epoch end), then after a snapshot (``state_dict``)."""

    def __init__(self, s3, bucket, prefix, logger, into):
        self.s3, self.bucket, self.prefix, self.logger, self.into = s3, bucket, prefix, logger, into
        self.seen = {}

    @hookimpl
    def on_epoch_begin(self, epoch):
        if epoch != 1:
            return
        deadline = time.monotonic() + 20  # the writer delivers every LOGGER_FLUSH_SECONDS
        while time.monotonic() < deadline:
            download(self.s3, self.bucket, self.prefix, self.into / "epoch_end")
            self.seen["epoch_end"] = values(self.into / "epoch_end")
            if ("train", "epoch_loss") in self.seen["epoch_end"]:
                break
            time.sleep(0.2)
        self.logger.state_dict()  # a snapshot: every record so far in the store when it returns
        download(self.s3, self.bucket, self.prefix, self.into / "snapshot")
        self.seen["snapshot"] = values(self.into / "snapshot")


def test_a_remote_log_dir_gets_the_event_files_a_local_one_gets(s3, bucket, tmp_path):
    url = f"s3://{bucket}/runs/tb"
    remote = TensorBoardLogger(url, update_freq=1, staging_dir=tmp_path / "staging")
    watcher = StoreWatcher(s3, bucket, "runs/tb", remote, tmp_path / "during")
    x, y = tiny_data(N)
    make_trainer([remote, watcher], seed=1).fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    local = TensorBoardLogger(tmp_path / "local", update_freq=1)
    make_trainer([local], seed=1).fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    names = download(s3, bucket, "runs/tb", tmp_path / "store")
    assert names and all(name.split("/")[0] in ("train", "validation") for name in names)  # no spool, no staging
    stored = values(tmp_path / "store")
    (staged,) = (tmp_path / "staging").glob("*/events")  # where the logger wrote them first
    assert stored == values(staged)
    # The same tags at the same steps as a local log_dir gets.
    assert {tag: sorted(steps) for tag, steps in stored.items()} == {
        tag: sorted(steps) for tag, steps in values(tmp_path / "local").items()
    }
    assert sorted(stored[("train", "batch_loss")]) == list(range(1, 25))
    assert stored[("train", "run_status")] == {24: "FINISHED"}
    assert url in stored[("train", "run_params")][0]

    # Uploaded during training: epoch 0 at its end (writer thread), every step before a snapshot.
    assert watcher.seen["epoch_end"][("train", "epoch_loss")] == {0: stored[("train", "epoch_loss")][0]}
    assert sorted(watcher.seen["snapshot"][("train", "batch_loss")]) == list(range(1, 13))


def test_a_remote_log_dir_is_checked_before_training(s3, bucket, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="TensorBoardLogger.*bucket 'no-such-bucket' does not exist"):
        TensorBoardLogger("s3://no-such-bucket/tb", staging_dir=tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with s3.checking_credentials():
        with pytest.raises(ConfigError, match="TensorBoardLogger.*refused the credentials") as refused:
            TensorBoardLogger(f"s3://{bucket}/tb", staging_dir=tmp_path)
    assert "not-the-secret" not in str(refused.value)


def test_a_run_resumed_on_another_machine_writes_each_point_once_to_the_store(s3, bucket, tmp_path):
    """The resumed process has none of its predecessor's local files (another staging_dir, as on
    another machine): it reads what the store holds first, so the steps the crashed process
    logged after its snapshot are not written a second time."""
    import corebus
    from corebus.plugins import BackupAndRestore

    class CrashAt7:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 15:  # after the snapshot of epoch 0's end (step 12)
                raise RuntimeError("power cut")

    url, backup = f"s3://{bucket}/tb", str(tmp_path / "backup")
    x, y = tiny_data(N)
    fit = {"batch_size": BATCH, "epochs": 2, "shuffle": False, "verbose": 0}
    first = TensorBoardLogger(url, update_freq=1, staging_dir=tmp_path / "machine-a")
    with pytest.raises(corebus.PluginError, match="power cut"):
        make_trainer([BackupAndRestore(backup, background=False), first, CrashAt7()]).fit(x, y, **fit)
    resumed = TensorBoardLogger(url, update_freq=1, staging_dir=tmp_path / "machine-b")
    make_trainer([BackupAndRestore(backup, background=False), resumed]).fit(x, y, **fit)

    download(s3, bucket, "tb", tmp_path / "store")
    stored = values(tmp_path / "store")  # asserts no (tag, step) twice, across every file
    assert sorted(stored[("train", "batch_loss")]) == list(range(1, 25))
    assert sorted(stored[("train", "epoch_loss")]) == [0, 1]
    assert sorted(stored[("train", "run_status")].items())[-1] == (24, "FINISHED")


def test_corebus_sync_writes_a_spool_left_in_the_staging_folder_and_uploads_it(s3, bucket, tmp_path):
    """Records a run could not write (a full disk) wait in the spool beside the staged files;
    ``corebus sync`` writes them and uploads the result to the run's URL."""
    from corebus.app.cli import main as cli_main
    from corebus.kit import Spool

    url = f"s3://{bucket}/synced"
    logger = TensorBoardLogger(url, staging_dir=tmp_path / "staging")
    staging = Path(logger._local_dir()).parent
    header = {"plugin": "tensorboard", "config": logger.get_config()}
    records = [{"type": "scalars", "run": "train", "step": s, "values": {"batch_loss": 1 / s}} for s in (1, 2, 4)]
    Spool(staging / "tensorboard.spool.jsonl", header).append(records + [{"type": "mirror"}])

    assert cli_main(["sync", str(tmp_path / "staging")]) == 0
    download(s3, bucket, "synced", tmp_path / "store")
    assert values(tmp_path / "store") == {("train", "batch_loss"): {1: 1.0, 2: 0.5, 4: 0.25}}
    assert not (staging / "tensorboard.spool.jsonl").exists()
