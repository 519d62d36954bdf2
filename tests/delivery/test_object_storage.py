"""Object storage for every path: checkpoints, run snapshots, backups and reports on ``s3://`` URLs,
against a real S3-compatible server (moto in server mode on 127.0.0.1, authentication on)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3_server

from corebus import ConfigError
from corebus import hookimpl as corebus_hookimpl
from corebus.delivery import storage
from corebus.kit import RunSnapshot, SnapshotError, check_remote_writable, is_remote, mirror_directory


def objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


# ---------------------------------------------------------------------- the storage kit


def test_is_remote_tells_urls_from_local_paths(tmp_path):
    assert is_remote("s3://bucket/prefix")
    assert is_remote("gs://bucket/x")
    assert not is_remote(str(tmp_path))
    assert not is_remote(tmp_path)
    assert not is_remote("file:///tmp/x")
    assert not is_remote("relative/dir")


def test_check_remote_writable_passes_and_leaves_nothing(s3, bucket):
    check_remote_writable(f"s3://{bucket}/runs/a")
    assert objects(s3, bucket) == {}


def test_a_missing_bucket_is_one_error_naming_it_and_the_fix(bucket):
    with pytest.raises(ConfigError, match=r"bucket 'no-such-bucket-here' does not exist.*aws s3 mb"):
        check_remote_writable("s3://no-such-bucket-here/runs")


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_refused_credentials_are_one_error_without_the_secret(s3, bucket, monkeypatch, variable):
    with s3.checking_credentials():
        check_remote_writable(f"s3://{bucket}/runs")  # the created user's key is accepted
        secret = "wrong-Secret-Value-0123456789"
        monkeypatch.setenv(variable, secret)
        with pytest.raises(ConfigError, match=r"refused the credentials.*AWS_ACCESS_KEY_ID") as info:
            check_remote_writable(f"s3://{bucket}/runs")
    if variable == "AWS_SECRET_ACCESS_KEY":
        assert secret not in str(info.value)


def test_missing_credentials_are_one_error_naming_the_variables(bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    # No profile of this host may stand in for them.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match=r"no credentials found.*AWS_SECRET_ACCESS_KEY"):
        check_remote_writable(f"s3://{bucket}/runs")


def test_an_unreachable_endpoint_is_one_error_naming_aws_endpoint_url(bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(ConfigError, match=r"cannot reach the store.*AWS_ENDPOINT_URL"):
        check_remote_writable(f"s3://{bucket}/runs")


def test_mirror_directory_uploads_new_and_changed_files_only(s3, bucket, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "events.1").write_bytes(b"first")
    (tmp_path / "top.txt").write_text("top")
    (tmp_path / ".x.tmp.part").write_text("a write in progress")
    url = f"s3://{bucket}/tb"
    mirror_directory(tmp_path, url)
    assert objects(s3, bucket) == {"tb/train/events.1": b"first", "tb/top.txt": b"top"}
    stamps = {o["Key"]: o["LastModified"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}

    time.sleep(1.1)  # LastModified has one-second resolution
    (tmp_path / "train" / "events.1").write_bytes(b"first, then more")
    mirror_directory(tmp_path, url)
    storage._MIRRORED.clear()  # a new process: unchanged objects are recognised by their MD5
    mirror_directory(tmp_path, url)
    assert objects(s3, bucket) == {"tb/train/events.1": b"first, then more", "tb/top.txt": b"top"}
    after = {o["Key"]: o["LastModified"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert after["tb/top.txt"] == stamps["tb/top.txt"]
    assert after["tb/train/events.1"] > stamps["tb/train/events.1"]


def test_mirror_directory_to_a_missing_bucket_is_a_config_error(bucket, tmp_path):
    (tmp_path / "a").write_text("a")
    with pytest.raises(ConfigError, match="does not exist"):
        mirror_directory(tmp_path, "s3://no-such-bucket-here/tb")


# ---------------------------------------------------------------------- run snapshots and backups

BACKUP_WORKER = Path(__file__).parents[1] / "workers" / "s3_backup_worker.py"


def test_a_snapshot_on_s3_is_complete_only_with_its_manifest(s3, bucket):
    url = f"s3://{bucket}/run"
    first = RunSnapshot({"rng/numpy": np.arange(3)}, _state(12))
    second = RunSnapshot({"rng/numpy": np.arange(3)}, _state(15))
    assert first.write(url) == f"{url}/snapshot-000000000012"
    second.write(url)
    stored = objects(s3, bucket)
    assert set(stored) == {
        f"run/snapshot-0000000000{s}/{f}" for s in (12, 15) for f in ("arrays.npz", "state.json", "manifest.json")
    }
    manifest = json.loads(stored["run/snapshot-000000000015/manifest.json"])
    assert manifest["files"]["state.json"] == hashlib.sha256(stored["run/snapshot-000000000015/state.json"]).hexdigest()
    assert RunSnapshot.latest(url).micro_step == 15

    client = s3.client()
    client.delete_object(Bucket=bucket, Key="run/snapshot-000000000015/manifest.json")  # upload cut short
    assert RunSnapshot.latest(url).micro_step == 12
    client.put_object(Bucket=bucket, Key="run/snapshot-000000000015/manifest.json", Body=json.dumps(manifest))
    client.put_object(Bucket=bucket, Key="run/snapshot-000000000015/state.json", Body=b"{}")  # object changed
    assert RunSnapshot.latest(url).micro_step == 12
    with pytest.raises(SnapshotError, match=r"snapshot-000000000015/state.json is corrupt"):
        RunSnapshot.load(f"{url}/snapshot-000000000015")

    RunSnapshot({"rng/numpy": np.arange(3)}, _state(20)).write(url, keep=2)  # the oldest goes
    assert sorted({k.split("/")[1] for k in objects(s3, bucket)}) == ["snapshot-000000000015", "snapshot-000000000020"]
    assert RunSnapshot.remove_leftovers(url) == []  # both have their manifest
    RunSnapshot.remove_all(url)
    assert objects(s3, bucket) == {}


def _state(step: int) -> dict:
    import random

    python = random.getstate()
    return {
        "format": 1,
        "micro_step": step,
        "global_step": step,
        "epoch": 0,
        "next_batch": step,
        "layout": {},
        "rng": {"python": [python[0], list(python[1]), python[2]], "numpy": ["MT19937", 0, 0, 0.0]},
    }


def run_backup_worker(out, url, server, *args):
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(BACKUP_WORKER), str(out), url, *args],
        stdout=subprocess.PIPE,
        stderr=open(out / "stderr.txt", "w"),  # a file: a pipe nobody reads could stall the worker
        text=True,
        env=s3_server.environment(server),
    )


@pytest.mark.slow
def test_sigkill_during_an_upload_leaves_the_previous_snapshot_and_resume_is_exact(s3, bucket, tmp_path):
    """A real worker process is killed while its 4th snapshot (step 16, the first epoch's end) is
    half uploaded; a reader takes the step-15 one, and the rerun ends with weights identical to an
    uninterrupted run's."""
    url = f"s3://{bucket}/killed"
    reference = run_backup_worker(tmp_path / "reference", f"s3://{bucket}/reference", s3)
    killed = run_backup_worker(tmp_path / "killed", url, s3, "--hang-in-upload", "4")
    try:
        line = killed.stdout.readline()  # printed once the first object of the snapshot is stored
    finally:
        os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    stderr = (tmp_path / "killed" / "stderr.txt").read_text()
    assert line.startswith("MID-UPLOAD snapshot-000000000016"), (line, stderr[-3000:])

    half = objects(s3, bucket, "killed/snapshot-000000000016/")
    assert set(half) == {"killed/snapshot-000000000016/arrays.npz"}  # no manifest: incomplete
    with pytest.raises(SnapshotError, match="incomplete: it has no manifest.json"):
        RunSnapshot.load(f"{url}/snapshot-000000000016")
    assert RunSnapshot.latest(url).micro_step == 15

    resumed = run_backup_worker(tmp_path / "killed", url, s3)
    for process, name in ((reference, "reference"), (resumed, "killed")):
        process.communicate(timeout=300)
        assert process.returncode == 0, (tmp_path / name / "stderr.txt").read_text()[-3000:]
    assert json.loads((tmp_path / "killed" / "process.json").read_text()) == {"restored_step": 15}
    assert f"removed {url}/snapshot-000000000016" in (tmp_path / "killed" / "stderr.txt").read_text()
    ref, got = np.load(tmp_path / "reference" / "final.npz"), np.load(tmp_path / "killed" / "final.npz")
    assert ref.files == got.files
    for key in ref.files:
        np.testing.assert_array_equal(ref[key], got[key])
    # Both runs ended normally: their snapshots are gone (delete_checkpoint), the half one too.
    assert objects(s3, bucket) == {}

    # The secret key was in every worker's environment: it is in nothing the runs wrote.
    secret = s3.env["AWS_SECRET_ACCESS_KEY"].encode()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path


# ---------------------------------------------------------------------- checkpoints and reports


def test_checkpoints_on_s3_are_the_files_keras_saves_locally(s3, bucket, tmp_path):
    """Keras's ModelCheckpoint (local disk) is the oracle for which files a run saves; ours, on
    s3, holds the same names and, read back, the same weights as a local run of ours."""
    import keras

    from corebus.plugins import ModelCheckpoint
    from corebus.testing import make_trainer, tiny_data, tiny_model

    x, y = tiny_data()
    pattern = "e{epoch}-b{batch:02d}.weights.h5"
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    keras_dir = tmp_path / "keras"
    reference = keras.callbacks.ModelCheckpoint(str(keras_dir / pattern), save_weights_only=True, save_freq=5)
    model.fit(x, y, callbacks=[reference], batch_size=8, epochs=2, shuffle=False, verbose=0)

    fit = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
    remote = ModelCheckpoint(f"s3://{bucket}/ckpt/{pattern}", save_weights_only=True, save_freq=5, save_last=True)
    make_trainer([remote], optimizer=keras.optimizers.SGD(0.1)).fit(x, y, **fit)
    local = ModelCheckpoint(tmp_path / "ours" / pattern, save_weights_only=True, save_freq=5, save_last=True)
    make_trainer([local], optimizer=keras.optimizers.SGD(0.1)).fit(x, y, **fit)

    stored = objects(s3, bucket, "ckpt/")
    assert sorted(k.removeprefix("ckpt/") for k in stored) == sorted(os.listdir(keras_dir)) + ["last.weights.h5"]
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(keras_dir)) + ["last.weights.h5"]
    for key, body in stored.items():
        downloaded = tmp_path / "downloaded" / key.rsplit("/", 1)[-1]
        downloaded.parent.mkdir(exist_ok=True)
        downloaded.write_bytes(body)
        a, b = tiny_model(), tiny_model()
        a.load_weights(str(downloaded))
        b.load_weights(str(tmp_path / "ours" / downloaded.name))
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)


def test_save_top_k_on_s3_deletes_the_objects_that_fall_out(s3, bucket):
    import keras

    from corebus.plugins import ModelCheckpoint
    from corebus.testing import make_trainer, tiny_data

    x, y = tiny_data()
    url = f"s3://{bucket}/best/{{epoch}}-{{val_loss:.4f}}.keras"
    plugin = ModelCheckpoint(url, monitor="val_loss", save_top_k=2)
    make_trainer([plugin], optimizer=keras.optimizers.SGD(3.0)).fit(
        x, y, batch_size=16, epochs=5, validation_split=0.25, shuffle=False, verbose=0
    )
    kept = sorted(f"s3://{bucket}/{k}" for k in objects(s3, bucket, "best/"))
    assert kept == sorted(p for p, _ in plugin._top_k)
    assert len(kept) == 2


def test_report_on_s3_is_read_back_by_the_cli(s3, bucket, tmp_path):
    from corebus.plugins import RunReport
    from corebus.testing import make_trainer, tiny_data

    url = f"s3://{bucket}/run-7/report"
    x, y = tiny_data()
    report = RunReport(report_dir=url)
    make_trainer([report]).fit(x, y, batch_size=16, epochs=2, verbose=0)
    stored = objects(s3, bucket, "run-7/report/")
    assert {"run-7/report/report.json", "run-7/report/report.html", "run-7/report/curves.png"} <= set(stored)
    assert json.loads(stored["run-7/report/report.json"])["run"]["name"] == "run-7"
    assert report.get_config()["report_dir"] == url

    out = subprocess.run(
        [sys.executable, "-m", "corebus.app.cli", "report", f"s3://{bucket}/run-7", "--out", str(tmp_path / "html")],
        capture_output=True,
        text=True,
        env=s3_server.environment(s3),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "html" / "report.html").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "corebus.app.cli", "report", f"s3://{bucket}/no-run"],
        capture_output=True,
        text=True,
        env=s3_server.environment(s3),
        timeout=120,
    )
    assert missing.returncode == 2 and f"no report.json under 's3://{bucket}/no-run'" in missing.stderr


@pytest.mark.parametrize(
    "plugin, argument, tail",
    [
        ("ModelCheckpoint", "filepath", "/m-{epoch}.keras"),
        ("BackupAndRestore", "backup_dir", ""),
        ("RunReport", "report_dir", ""),
    ],
)
def test_a_missing_bucket_fails_before_training(bucket, plugin, argument, tail):
    import corebus.plugins
    from corebus.testing import make_trainer, tiny_data

    x, y = tiny_data()
    steps = []

    class Steps:
        @corebus_hookimpl
        def on_train_batch_end(self, trainer):
            steps.append(trainer.global_step)

    with pytest.raises(ConfigError, match="bucket 'no-such-bucket-here' does not exist") as info:
        chosen = getattr(corebus.plugins, plugin)(**{argument: "s3://no-such-bucket-here/run" + tail})
        make_trainer([chosen, Steps()]).fit(x, y, epochs=1, verbose=0)
    assert steps == []
    assert "aws s3 mb" in str(info.value)
