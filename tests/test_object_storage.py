"""Object storage for every path: checkpoints, run snapshots, backups and reports on ``s3://`` URLs,
against a real S3-compatible server (moto in server mode on 127.0.0.1, authentication on)."""

from __future__ import annotations

import os
import time

import pytest
import s3_server

from corebus import ConfigError
from corebus.delivery import storage
from corebus.kit import check_remote_writable, is_remote, mirror_directory


@pytest.fixture(scope="session")
def s3():
    server = s3_server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3, monkeypatch):
    """A fresh bucket, with the environment set to reach the server with valid credentials."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3.make_bucket()


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
def test_refused_credentials_are_one_error_without_the_secret(bucket, monkeypatch, variable):
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
