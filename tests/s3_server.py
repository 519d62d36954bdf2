"""A local S3-compatible server for the tests: moto in server mode, a real HTTP server on 127.0.0.1.

At start the server creates an IAM user and its access key: the credentials callers put into the
environment (:attr:`S3Server.env`, with ``AWS_ENDPOINT_URL``). Its signature checks are on only
inside :meth:`S3Server.checking_credentials` (there it refuses any other key): moto 5.2's check
rejects valid signatures of listings with a ``delimiter``, which every prefix listing sends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

import boto3

_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"corebus-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _set_auth(self, free_requests: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=free_requests.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=5).read()

    @contextlib.contextmanager
    def checking_credentials(self):
        """Within: the server accepts only the created user's key, as a real store does."""
        self._set_auth("0")
        try:
            yield
        finally:
            self._set_auth("inf")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start() -> S3Server:
    """Start moto's server on a free port of 127.0.0.1 and create credentials that it accepts."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the local S3 server (python -m moto.server) did not start") from None
            time.sleep(0.2)
    server = S3Server(endpoint, process)
    anonymous = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap", "region_name": "us-east-1"}
    iam = boto3.client("iam", endpoint_url=endpoint, **anonymous)
    iam.create_user(UserName="corebus-test")
    key = iam.create_access_key(UserName="corebus-test")["AccessKey"]
    iam.put_user_policy(UserName="corebus-test", PolicyName="s3", PolicyDocument=json.dumps(_POLICY))
    server.env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server._set_auth("inf")
    return server


def environment(server: S3Server) -> dict[str, str]:
    """``os.environ`` for a child process that talks to ``server`` (no profile files of the host)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env)
    return env
