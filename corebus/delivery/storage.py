"""Object storage for every path a plugin writes: ``s3://bucket/prefix`` (and other fsspec URLs).

Why fsspec (with s3fs for ``s3://``): TensorFlow 2.21's ``tf.io.gfile`` has no S3 file system
without the separate ``tensorflow-io`` package, which does not follow TensorFlow releases; fsspec
is the file-system layer pandas, Ray's pyarrow and Hugging Face already use, and the same calls
reach GCS (``gcsfs``) and Azure (``adlfs``) when their package is installed.

Credentials come only from the environment, as every AWS tool reads them: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the shared config files, and
``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph, a local test server). corebus never
takes them as parameters, so they cannot reach a run's params, logs or snapshots, and every error
text built here has the secret values cut out.

Object stores have no atomic rename of a directory: a writer stages files locally, uploads them,
and writes a manifest last (see :mod:`corebus.delivery.snapshot`). One object's PUT is atomic: a
reader sees the whole object or none.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import uuid
from pathlib import Path
from typing import Any

from corebus.errors import ConfigError, require_module

# Credentials and endpoint settings a file system object is built from: a change of any of them
# (a test, a long-lived process switching profiles) builds a new one.
_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
_CACHE: dict[tuple[str, str], Any] = {}
_CACHE_GUARD = threading.Lock()
# What mirror_directory uploaded: (url of the file) -> (mtime_ns, size) of the local file then.
_MIRRORED: dict[str, tuple[int, int]] = {}


def is_remote(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a URL of a store other than the local disk (``s3://...``)."""
    if path is None or isinstance(path, Path):
        return False
    text = os.fspath(path)
    if "://" not in text:
        return False
    return text.split("://", 1)[0].lower() not in ("file", "local")


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended, ``/``-separated."""
    return posixpath.join(url.rstrip("/"), *parts)


def scrub(text: str) -> str:
    """``text`` without the secret credential values of the environment (for error messages)."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def filesystem(url: str) -> Any:
    """The fsspec file system for ``url`` (built from the environment, reused while it is unchanged)."""
    protocol = url.split("://", 1)[0].lower()
    module, extra = _EXTRAS.get(protocol, (None, None))
    if module is not None:
        require_module(module, extra=extra, what=f"the storage URL {url!r}")
    import fsspec

    env = "\0".join(os.environ.get(name, "") for name in _ENV)
    key = (protocol, hashlib.sha256(env.encode()).hexdigest())
    with _CACHE_GUARD:
        fs = _CACHE.get(key)
        if fs is None:
            try:
                # skip_instance_cache: fsspec's own cache would keep a file system built from
                # credentials that have changed since.
                fs = fsspec.filesystem(protocol, skip_instance_cache=True)
            except (ImportError, ValueError) as exc:
                raise ConfigError(f"cannot open storage URL {url!r}: {scrub(str(exc))}") from exc
            _CACHE[key] = fs
    return fs


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """``(pyarrow file system, path)`` for ``url``: pyarrow's view of the same fsspec file system
    (what Ray Train takes as ``RunConfig(storage_filesystem=..., storage_path=path)``), so Ray
    reads and writes with the same credentials and endpoint as the rest of corebus. It pickles
    without credentials: each Ray worker builds its own from its environment."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(filesystem(url))), strip(url)


def strip(url: str) -> str:
    """The path part of ``url`` as its file system names it (``bucket/prefix``)."""
    return url.split("://", 1)[1].rstrip("/")


def bucket(url: str) -> str:
    return strip(url).split("/", 1)[0]


def explain(url: str, exc: BaseException, owner: str = "storage") -> ConfigError:
    """One clear error for a store that refused a request: what is wrong and how to fix it."""
    name = type(exc).__name__
    text = scrub(f"{name}: {exc}")
    where = f"{owner}: {url!r}"
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        return ConfigError(
            f"{where}: the bucket {bucket(url)!r} does not exist ({text}). Create it (aws s3 mb "
            f"s3://{bucket(url)}) or fix the URL"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return ConfigError(
            f"{where}: no credentials found ({text}). Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment"
        )
    if isinstance(exc, PermissionError) or any(
        word in text for word in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")
    ):
        return ConfigError(
            f"{where}: the store refused the credentials ({text}). Check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and that they may write to this bucket"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
        exc, (ConnectionError, TimeoutError)
    ):
        return ConfigError(
            f"{where}: cannot reach the store ({text}). Check the network and AWS_ENDPOINT_URL "
            f"(now {os.environ.get('AWS_ENDPOINT_URL', 'unset')!r})"
        )
    return ConfigError(f"{where}: cannot write there ({text})")


def check_remote_writable(url: str, owner: str = "storage") -> None:
    """Fail before training unless an object can be written under ``url`` (then removed).

    Raises :class:`corebus.ConfigError` naming the problem (a missing bucket, refused or missing
    credentials, an unreachable endpoint, a missing extra) and the fix.
    """
    if not is_remote(url):
        raise ConfigError(f"{owner}: {url!r} is not a storage URL (such as s3://bucket/prefix)")
    if not strip(url):
        raise ConfigError(f"{owner}: {url!r} names no bucket; use s3://bucket/prefix")
    fs = filesystem(url)
    probe = join(strip(url), f".corebus-write-test.{uuid.uuid4().hex}")
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:  # every refusal becomes one error naming the fix
        raise explain(url, exc, owner) from None


def upload(local: str | os.PathLike, url: str) -> None:
    """Upload one local file to ``url`` (one PUT: readers see all of it or nothing)."""
    filesystem(url).put_file(os.fspath(local), strip(url))


def download(url: str, local: str | os.PathLike) -> None:
    filesystem(url).get_file(strip(url), os.fspath(local))


def read_bytes(url: str) -> bytes:
    return filesystem(url).cat_file(strip(url))


def exists(url: str) -> bool:
    return filesystem(url).exists(strip(url))


def remove(url: str, recursive: bool = False) -> None:
    """Remove an object, or every object under a prefix; a missing one is no error."""
    fs = filesystem(url)
    try:
        fs.rm(strip(url), recursive=recursive)
    except FileNotFoundError:
        pass


def listdir(url: str) -> list[str]:
    """The names directly under ``url`` (objects and prefixes), sorted; empty when there is none."""
    fs = filesystem(url)
    try:
        entries = fs.ls(strip(url), detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def mirror_directory(local_dir: str | os.PathLike, url: str) -> None:
    """Upload the files under ``local_dir`` that are new or changed to ``url``, same relative names.

    Idempotent: a file this process uploaded is sent again only when its size or mtime changed;
    one uploaded by an earlier process is skipped when the stored object has its size and MD5
    (the S3 ETag of a single-part upload). Hidden temporary files (``.*.tmp*``) are skipped.
    """
    root = Path(local_dir)
    if not root.is_dir():
        return
    fs = filesystem(url)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.startswith(".") and ".tmp" in path.name:
            continue
        relative = path.relative_to(root).as_posix()
        target = join(strip(url), relative)
        stat = path.stat()
        seen = (stat.st_mtime_ns, stat.st_size)
        if _MIRRORED.get(target) == seen:
            continue
        if target not in _MIRRORED and _same_object(fs, target, path, stat.st_size):
            _MIRRORED[target] = seen
            continue
        try:
            fs.put_file(os.fspath(path), target)
        except Exception as exc:
            raise explain(url, exc, "mirror_directory") from None
        _MIRRORED[target] = seen


def _same_object(fs: Any, target: str, path: Path, size: int) -> bool:
    try:
        info = fs.info(target)
    except (FileNotFoundError, OSError):
        return False
    if info.get("size") != size:
        return False
    etag = str(info.get("ETag", "")).strip('"')
    if not etag or "-" in etag:  # a multipart ETag is no MD5 of the content: upload again
        return False
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() == etag


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
