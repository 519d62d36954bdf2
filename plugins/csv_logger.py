"""Stream epoch results to a CSV file, like ``keras.callbacks.CSVLogger``."""

from __future__ import annotations

import collections
import csv
import logging
import os
from typing import Any

import numpy as np

from corebus import ConfigError, hookimpl
from corebus.kit import RunLock, atomic_path, check_writable

log = logging.getLogger("corebus")


class CSVLogger:
    """``keras.callbacks.CSVLogger``: the same file, byte for byte, for the same run.

    One row per epoch: an ``epoch`` column, then the first epoch's log names sorted (plus
    ``val_*`` twins, written as ``NA``, when no validation ran), values as Python writes them.
    The file is flushed after every row. ``append=True`` appends, writing the header only if
    the file is empty.

    Differences from Keras: the path is checked when the logger is built (a missing parent
    directory is created; a path that cannot be written raises :class:`corebus.ConfigError`
    before training), the separator must be one character (``csv`` requires it), and only
    local paths are supported. After :meth:`load_state_dict` (a resumed run) the next ``fit``
    keeps the header and the rows up to the restored epoch, drops rows written after the
    snapshot, and appends, so the file ends as an uninterrupted run's would.
    """

    runs_on = "chief"  # under tf.distribute: one writer, not one per worker

    def __init__(self, filename: str | os.PathLike, separator: str = ",", append: bool = False):
        if not isinstance(separator, str) or len(separator) != 1:
            raise ConfigError(f"CSVLogger: separator={separator!r} must be a single character such as ','")
        self.filename = os.fspath(filename)
        if os.path.isdir(self.filename):
            raise ConfigError(f"CSVLogger: filename={self.filename!r} is a directory; pass a file path")
        check_writable(os.path.dirname(os.path.abspath(self.filename)), "CSVLogger")
        if os.path.exists(self.filename) and not os.access(self.filename, os.W_OK):
            raise ConfigError(f"CSVLogger: {self.filename!r} exists and is not writable")
        self.sep = separator
        self.append = append
        self.writer: Any = None
        self.keys: list[str] | None = None
        self.append_header = True
        self.csv_file: Any = None
        self._last_epoch: int | None = None
        self._resume: dict[str, Any] | None = None
        self._mode = "a" if append else "w"
        self._offset: int | None = None  # the file's length after the last row written
        self._lock = RunLock(self.filename, "CSVLogger", directory=False)

    @hookimpl
    def on_train_begin(self):
        # The file is opened at the first row, not here: a resumed run's state is restored after
        # this hook (BackupAndRestore is trylast), and opening with "w" now would erase the rows
        # written before the snapshot.
        self._lock.acquire()  # one run writes this file
        self._close()
        self.writer = None
        if self._resume is None:
            self.keys = None
            self._mode = "a" if self.append else "w"
            exists = self._mode == "a" and os.path.exists(self.filename)
            self._offset = os.path.getsize(self.filename) if exists else 0

    def _open(self) -> None:
        resume, self._resume = self._resume, None
        mode = self._mode
        if resume is not None:
            self._truncate_to(resume)
            mode = "a"
            self.keys = resume["keys"]
        self.append_header = True
        if mode == "a" and os.path.exists(self.filename):
            with open(self.filename) as f:
                self.append_header = not bool(len(f.readline()))
        try:
            self.csv_file = open(self.filename, mode)  # text mode, as Keras: rows end in \r\n
        except OSError as exc:
            raise ConfigError(f"CSVLogger: cannot open {self.filename!r}: {exc.strerror or exc}") from exc
        self._offset = self.csv_file.tell() if mode == "a" else 0

    @hookimpl
    def on_epoch_end(self, epoch, logs):
        logs = logs or {}
        if self.csv_file is None:
            self._open()
        if self.keys is None:
            self.keys = sorted(logs.keys())
            if self.keys and not any(key.startswith("val_") for key in self.keys):
                self.keys.extend([f"val_{k}" for k in self.keys])
        if not self.writer:

            class CustomDialect(csv.excel):
                delimiter = self.sep

            self.writer = csv.DictWriter(self.csv_file, fieldnames=["epoch"] + self.keys, dialect=CustomDialect)
            if self.append_header:
                self.writer.writeheader()
        row = collections.OrderedDict({"epoch": epoch})
        row.update((key, _handle_value(logs.get(key, "NA"))) for key in self.keys)
        self.writer.writerow(row)
        self.csv_file.flush()
        self._last_epoch = epoch
        self._offset = self.csv_file.tell()

    @hookimpl
    def on_train_end(self):
        if self.csv_file is None and self._resume is None and self._mode == "w":
            self._open()  # no epoch ran: Keras still leaves an empty file
        self._close()
        self._lock.release()

    @hookimpl
    def on_exception(self):
        try:
            self._close()
        finally:
            self._lock.release()

    def _close(self) -> None:
        if self.csv_file and not self.csv_file.closed:
            self.csv_file.close()
        self.csv_file = None
        self.writer = None

    def _truncate_to(self, resume: dict[str, Any]) -> None:
        """Drop what was written after the snapshot (the run died later and writes it again)."""
        if not os.path.exists(self.filename):
            return
        offset = resume.get("offset")
        if offset is not None:
            size = os.path.getsize(self.filename)
            if size < offset:
                log.warning(
                    "CSVLogger: %s holds %d bytes, the snapshot expected %d; appending to what is there",
                    self.filename,
                    size,
                    offset,
                )
            elif size > offset:
                with open(self.filename, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
            return
        # A snapshot of an older corebus holds the last epoch only: keep rows up to it.
        last_epoch = resume.get("last_epoch")
        with open(self.filename, newline="") as f:
            lines = f.readlines()
        keep = lines[:1] + [
            line for line in lines[1:] if last_epoch is not None and int(line.split(self.sep, 1)[0]) <= last_epoch
        ]
        with atomic_path(self.filename) as tmp, open(tmp, "w", newline="") as f:
            f.writelines(keep)

    def state_dict(self) -> dict[str, Any]:
        # offset: the file's length after the last row of the snapshot; a resume cuts it there.
        return {"keys": self.keys, "last_epoch": self._last_epoch, "offset": self._offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        offset = state.get("offset")
        if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool) or offset < 0):
            raise ValueError(f"CSVLogger: the snapshot's file offset {offset!r} is not a byte count")
        keys = state.get("keys")
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ValueError(f"CSVLogger: the snapshot's column names {keys!r} are not a list of names")
        self._resume = {"keys": state.get("keys"), "last_epoch": state.get("last_epoch"), "offset": offset}
        self.keys = self._resume["keys"]
        self._last_epoch = self._resume["last_epoch"]
        self._offset = offset


def _handle_value(value: Any) -> Any:
    """Keras's formatting: strings as is, 1-D iterables as a quoted list, the rest by csv."""
    if isinstance(value, str):
        return value
    if isinstance(value, collections.abc.Iterable) and not (isinstance(value, np.ndarray) and value.ndim == 0):
        return f'"[{", ".join(map(str, value))}]"'
    return value
