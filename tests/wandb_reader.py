"""Read a W&B run's ``.wandb`` transaction log back from disk (wandb has no public reader).

The file is a leveldb-style record log, the format of ``wandb/sdk/internal/datastore.py`` in
wandb < 0.19 (now written by wandb-core with the same layout):

- a 7-byte file header: ident ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version (uint8);
- then 32 KiB blocks of chunks, each with a 7-byte header ``<IHB``: crc32 of (type byte,
  data), data length, type ``FULL=1 | FIRST=2 | MIDDLE=3 | LAST=4``. A chunk never starts in
  the last 6 bytes of a block (zero padding);
- a record is one FULL chunk or FIRST + MIDDLE* + LAST; its data is a serialized
  ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> list[Any]:
    """Every ``Record`` in the file, in order; raises on a bad header or checksum."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _version = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    records, parts, pos = [], [], HEADER.size
    while pos + CHUNK.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK.size:  # trailer: skip to the next block
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + CHUNK.size : pos + CHUNK.size + length]
        if len(chunk) < length:
            break  # torn tail (writer still running or killed)
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at offset {pos}")
        pos += CHUNK.size + length
        if kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts + [chunk]) if kind == LAST else chunk)
            records.append(record)
            parts = []
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at offset {pos}")
    return records


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class WandbRun:
    """What one ``.wandb`` file says about its run."""

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)
    alerts: list[Any] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)  # system metrics samples
    environment: Any = None  # the environment records merged (program, python, host...)
    exit_code: int | None = None
    start_time: float | None = None  # when wandb.init began (time.time())
    runtime: int | None = None  # whole seconds from wandb.init to finish, as W&B measured them

    def metric(self, key: str) -> dict[int, Any]:
        """``{step: value}`` of one history key."""
        return {row["_step"]: row[key] for row in self.history if key in row}


def read_run(path: str | Path, wait: float = 10.0) -> WandbRun:
    """Fold the records of one ``.wandb`` file into history rows, config, summary, exit code.

    ``run.finish()`` returns before wandb-core has written the whole file (it writes on its own
    schedule, and at the latest when the process exits), so wait up to ``wait`` seconds for
    the run's exit record.
    """
    deadline = time.monotonic() + wait
    while True:
        run = _fold(path)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


def _fold(path: str | Path) -> WandbRun:
    run = WandbRun(Path(path))
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            run.name, run.tags = record.run.display_name, list(record.run.tags)
            run.start_time = record.run.start_time.ToMicroseconds() / 1e6
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "alert":
            run.alerts.append(record.alert)
        elif kind == "stats":
            run.stats.append({_key(item): json.loads(item.value_json) for item in record.stats.item})
        elif kind == "environment":  # W&B writes it in parts
            if run.environment is None:
                run.environment = type(record.environment)()
            run.environment.MergeFrom(record.environment)
        elif kind == "exit":
            run.exit_code, run.runtime = record.exit.exit_code, record.exit.runtime
    return run


def run_files(wandb_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """The ``.wandb`` files under ``<dir>/wandb/`` (of one run id), oldest first.

    Each ``wandb.init`` writes ``<mode>-run-<YYYYmmdd_HHMMSS>-<id>/run-<id>.wandb``; a second
    one with the same id in the same second gets the directory suffix ``-1``, ``-2``...
    """

    def started(path: Path) -> tuple[str, int]:
        stamp = path.parent.name.split("-run-", 1)[1][:15]
        suffix = path.parent.name.rsplit(path.stem[len("run-") :], 1)[1].lstrip("-")
        return stamp, int(suffix or 0)

    pattern = f"*-run-*/run-{run_id}.wandb" if run_id else "*-run-*/run-*.wandb"
    return sorted(Path(wandb_dir, "wandb").glob(pattern), key=started)


def offline_environment(scratch: Path, wandb_dir: Path | None = None) -> dict[str, str]:
    """Environment variables for a W&B offline run that connects nowhere and writes only under
    ``scratch`` (its data, cache, config and artifact folders) and ``wandb_dir`` (the runs, when
    the logger is given no ``dir``): no code or git capture, no system stats or machine info."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB__DISABLE_STATS": "true",
        "WANDB__DISABLE_META": "true",
        "WANDB__DISABLE_MACHINE_INFO": "true",
        "WANDB_DATA_DIR": str(scratch / "wandb-data"),
        "WANDB_CACHE_DIR": str(scratch / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(scratch / "wandb-config"),
        "WANDB_ARTIFACT_DIR": str(scratch / "wandb-artifacts"),
    }
    if wandb_dir is not None:
        env["WANDB_DIR"] = str(wandb_dir)
    return env
