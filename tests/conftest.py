import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def s3():
    """One local S3-compatible server (moto in server mode, tests/s3_server.py) on 127.0.0.1 for the
    session; each test makes its own bucket."""
    import s3_server

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
