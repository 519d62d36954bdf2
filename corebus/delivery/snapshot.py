"""Run snapshots: everything needed to continue a run at the exact next step.

A snapshot holds every variable that changes while training (model weights and seed-generator
states, optimizer slots and iteration count, metric accumulators, the engine's step counter,
gradient accumulators, the LR multiplier), plus a JSON run state (epoch, position within the
epoch, shuffle seed, LR controller, every plugin's ``state_dict()``, Python / NumPy RNG).

On disk (no pickle anywhere; arrays in ``.npz`` loaded with ``allow_pickle=False``)::

    <dir>/snapshot-000000001234/  arrays.npz  state.json  manifest.json (sha256 of both)

Writing is transactional: a hidden temporary directory is written, fsynced and renamed into
place, and the previous snapshot is deleted only once the new one is complete (double
buffering). Loading verifies the manifest; a corrupt or truncated snapshot is reported by name
and the previous good one is used, never a partial load.

On object storage (``s3://bucket/prefix``: no atomic rename of a directory) the snapshot is
staged in a local temporary directory, its objects are uploaded, and ``manifest.json`` is
uploaded last: a snapshot is complete only when its manifest is there and every object it lists
has its sha256. A reader downloads and verifies; an incomplete one (its writer was killed during
the upload) is skipped and the previous complete one is taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from corebus.delivery import storage
from corebus.delivery.io import fsync_path
from corebus.errors import ConfigError, PluginError

log = logging.getLogger("corebus")

FORMAT = 1
PREFIX = "snapshot-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _host_copy(variable: Any) -> np.ndarray:
    """The variable's value in an array of its own. A Keras variable's ``numpy()`` is already a
    fresh copy; a second copy of a large model's weights and slots on the training thread was
    half the capture's time. A TensorFlow tensor's ``numpy()`` may be a view of its buffer."""
    value = variable.numpy()
    if isinstance(value, np.ndarray) and value.flags.owndata and value.flags.writeable:
        return value
    return np.array(value, copy=True)


def _describe(variable: Any) -> list[Any]:
    name = getattr(variable, "path", None) or getattr(variable, "name", "?")
    return [str(name), list(variable.shape), str(np.dtype(getattr(variable.dtype, "as_numpy_dtype", variable.dtype)))]


class SnapshotError(ConfigError):
    """A snapshot that cannot be used: corrupt, truncated, or from another model."""


_FILES = ("arrays.npz", "state.json")


def _check_state(state: dict[str, Any], path: Path) -> None:
    """The shape of a run state, checked before anything is restored from it."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SnapshotError(f"snapshot {path / 'state.json'} is malformed: {what}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    for key in ("micro_step", "global_step", "epoch", "next_batch"):
        need(integer(state.get(key)), f"{key!r} must be a non-negative integer, not {state.get(key)!r}")
    layout = state.get("layout")
    need(
        isinstance(layout, dict) and all(isinstance(v, list) for v in layout.values()),
        "'layout' must map groups to lists of variables",
    )
    for group, saved in layout.items():
        need(
            all(isinstance(e, list) and len(e) == 3 and isinstance(e[1], list) for e in saved),
            f"layout of {group!r} must list [name, shape, dtype] entries",
        )
    rng = state.get("rng")
    need(
        isinstance(rng, dict)
        and isinstance(rng.get("python"), list)
        and len(rng["python"]) == 3
        and isinstance(rng.get("numpy"), list)
        and len(rng["numpy"]) == 4,
        "'rng' is not an RNG state",
    )
    for key in ("lr", "plugins"):
        need(isinstance(state.get(key, {}), dict), f"{key!r} must be a mapping")


class RunSnapshot:
    """A captured run: ``arrays`` (name -> numpy array) and ``state`` (JSON-serialisable)."""

    def __init__(self, arrays: dict[str, np.ndarray], state: dict[str, Any], path: Path | str | None = None):
        self.arrays = arrays
        self.state = state
        self.path = path

    @property
    def micro_step(self) -> int:
        return int(self.state["micro_step"])

    @property
    def directory_name(self) -> str:
        """The name of this snapshot's directory inside a backup directory."""
        return f"{PREFIX}{self.micro_step:012d}"

    # ------------------------------------------------------------------ capture

    @classmethod
    def capture(cls, trainer: Any) -> "RunSnapshot":
        """Copy the run's state to host memory (on the training thread, between steps)."""
        groups = trainer._state_variables()
        arrays: dict[str, np.ndarray] = {}
        layout: dict[str, list[Any]] = {}
        for group, variables in groups.items():
            layout[group] = [_describe(v) for v in variables]
            for i, variable in enumerate(variables):
                arrays[f"{group}/{i}"] = _host_copy(variable)
        numpy_state = np.random.get_state()
        arrays["rng/numpy"] = np.asarray(numpy_state[1])
        python_state = random.getstate()
        state = {
            "format": FORMAT,
            "layout": layout,
            "rng": {
                "python": [python_state[0], list(python_state[1]), python_state[2]],
                "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
            },
            **trainer._run_state(),
        }
        return cls(arrays, state)

    # ------------------------------------------------------------------ disk

    def write(self, directory: str | os.PathLike, keep: int = 2) -> Path | str:
        """Write transactionally into ``directory`` (a path or a storage URL); keep the ``keep``
        newest snapshots."""
        if storage.is_remote(directory):
            return self._write_remote(os.fspath(directory), keep)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = self.directory_name
        final = directory / name
        tmp = directory / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            np.savez(tmp / "arrays.npz", **self.arrays)
            (tmp / "state.json").write_text(json.dumps(self.state), encoding="utf-8")
            manifest = {
                "format": FORMAT,
                "micro_step": self.micro_step,
                "files": {f: _sha256(tmp / f) for f in ("arrays.npz", "state.json")},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
            fsync_path(tmp)
            if final.exists():  # the same step written twice (epoch end right after a step save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(final / "manifest.json")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.path = final
        return final

    def _write_remote(self, url: str, keep: int) -> str:
        final = storage.join(url, self.directory_name)
        staging = Path(tempfile.mkdtemp(prefix="corebus-snapshot-"))
        try:
            np.savez(staging / "arrays.npz", **self.arrays)
            (staging / "state.json").write_text(json.dumps(self.state), encoding="utf-8")
            manifest = {
                "format": FORMAT,
                "micro_step": self.micro_step,
                "files": {f: _sha256(staging / f) for f in _FILES},
            }
            (staging / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
            # The same step written twice: its old manifest goes first, so a reader never pairs
            # it with objects of the new write.
            storage.remove(storage.join(final, "manifest.json"))
            for name in (*_FILES, "manifest.json"):  # the manifest last: it completes the snapshot
                storage.upload(staging / name, storage.join(final, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for old in [n for n in storage.listdir(url) if n.startswith(PREFIX)][:-keep]:
            storage.remove(storage.join(url, old, "manifest.json"))  # unusable first, then gone
            storage.remove(storage.join(url, old), recursive=True)
        self.path = final
        return final

    @classmethod
    def _load_remote(cls, url: str) -> "RunSnapshot":
        """Download a snapshot's objects and verify them (the manifest first: none, no snapshot)."""
        staging = Path(tempfile.mkdtemp(prefix="corebus-snapshot-"))
        try:
            try:
                storage.download(storage.join(url, "manifest.json"), staging / "manifest.json")
            except FileNotFoundError:
                raise SnapshotError(
                    f"snapshot {url} is incomplete: it has no manifest.json (its upload never finished)"
                ) from None
            for name in _FILES:
                try:
                    storage.download(storage.join(url, name), staging / name)
                except FileNotFoundError:
                    pass  # reported by the manifest check as missing
            try:
                snapshot = cls.load(staging)
            except SnapshotError as exc:
                raise SnapshotError(str(exc).replace(str(staging), url)) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        snapshot.path = url
        return snapshot

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunSnapshot":
        """Load one snapshot directory, verifying its manifest; errors name the bad file.

        A snapshot is data, never instructions: the manifest must list exactly the snapshot's
        own files by plain names, each with a matching sha256, and the state must have the
        expected shape. Anything else raises :class:`SnapshotError` (the snapshot is unusable).
        """
        if storage.is_remote(path):
            return cls._load_remote(os.fspath(path))
        path = Path(path)
        try:
            return cls._load(path)
        except SnapshotError:
            raise
        except Exception as exc:  # any other malformation (a bad zip, a wrong type) is unusable too
            raise SnapshotError(f"snapshot {path} is malformed: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _load(cls, path: Path) -> "RunSnapshot":
        manifest_file = path / "manifest.json"
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"snapshot {manifest_file} is missing or corrupt: {exc}") from exc
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or set(files) != set(_FILES):
            raise SnapshotError(
                f"snapshot {manifest_file} is corrupt: its 'files' map must list exactly "
                f"{', '.join(_FILES)} (it lists {sorted(files) if isinstance(files, dict) else files!r})"
            )
        for file, expected in files.items():
            actual = _sha256(path / file) if (path / file).is_file() else "missing"
            if actual != expected:
                raise SnapshotError(f"snapshot file {path / file} is corrupt or truncated (checksum mismatch)")
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SnapshotError(f"snapshot {path / 'state.json'} is corrupt: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise SnapshotError(f"snapshot {path} has format {found!r}; this corebus reads {FORMAT}")
        _check_state(state, path)
        with np.load(path / "arrays.npz", allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        expected_arrays = {f"{group}/{i}" for group, saved in state["layout"].items() for i in range(len(saved))}
        missing = sorted((expected_arrays | {"rng/numpy"}) - set(arrays))
        if missing:
            raise SnapshotError(
                f"snapshot {path / 'arrays.npz'} lacks arrays its state lists: {', '.join(missing[:5])}"
            )
        return cls(arrays, state, path)

    @classmethod
    def latest(cls, directory: str | os.PathLike) -> "RunSnapshot | None":
        """The newest valid snapshot in ``directory`` (a corrupt newer one is reported and
        skipped); ``None`` if there is none; an error if every snapshot there is corrupt."""
        for snapshot in cls._usable(directory):
            return snapshot
        return None

    @classmethod
    def restore_latest(cls, directory: str | os.PathLike, trainer: Any) -> "RunSnapshot | None":
        """Restore the newest snapshot of ``directory`` that loads *and* restores (a plugin may
        refuse its state, e.g. a path outside its own directory); ``None`` if there is none."""
        for snapshot in cls._usable(directory, restore=trainer):
            return snapshot
        return None

    @classmethod
    def _usable(cls, directory: str | os.PathLike, restore: Any = None) -> Iterator["RunSnapshot"]:
        if storage.is_remote(directory):
            url = os.fspath(directory)
            names = [n for n in storage.listdir(url) if n.startswith(PREFIX)]
            candidates = [storage.join(url, n) for n in sorted(names, reverse=True)]
        else:
            candidates = sorted(Path(directory).glob(f"{PREFIX}*"), reverse=True)
        errors = []
        for candidate in candidates:
            try:
                snapshot = cls.load(candidate)
                if restore is not None:
                    snapshot.restore(restore)
            except SnapshotError as exc:
                log.warning("skipping unusable snapshot: %s", exc)
                errors.append(str(exc))
                continue
            yield snapshot
            return
        if errors:
            raise SnapshotError("no usable snapshot in " + str(directory) + ": " + "; ".join(errors))

    @staticmethod
    def remove_leftovers(directory: str | os.PathLike) -> list[Path | str]:
        """Remove the temporary directories of writes that never finished (their writer died).

        Call it only while holding the directory's :class:`corebus.RunLock`: no live writer then.
        On object storage these are the snapshots without a manifest."""
        if storage.is_remote(directory):
            url, removed_urls = os.fspath(directory), []
            for name in storage.listdir(url):
                target = storage.join(url, name)
                if name.startswith(PREFIX) and not storage.exists(storage.join(target, "manifest.json")):
                    storage.remove(target, recursive=True)
                    removed_urls.append(target)
            return removed_urls
        removed: list[Path | str] = []
        for tmp in Path(directory).glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        return removed

    @staticmethod
    def remove_all(directory: str | os.PathLike) -> None:
        """Remove every snapshot of ``directory`` (each manifest first: never a half-removed one
        that still looks complete)."""
        if storage.is_remote(directory):
            url = os.fspath(directory)
            for name in storage.listdir(url):
                if name.startswith(PREFIX):
                    storage.remove(storage.join(url, name, "manifest.json"))
                    storage.remove(storage.join(url, name), recursive=True)
            return
        if Path(directory).exists():
            for snapshot in Path(directory).glob(f"{PREFIX}*"):
                shutil.rmtree(snapshot, ignore_errors=True)

    # ------------------------------------------------------------------ restore

    def restore(self, trainer: Any) -> None:
        """Put the run back exactly; validates everything before changing anything."""
        groups = trainer._state_variables()
        where = self.path or "the snapshot"
        saved_layout = self.state["layout"]
        for group, variables in groups.items():
            saved = saved_layout.get(group, [])
            if len(saved) != len(variables):
                raise SnapshotError(
                    f"{where} was written by a different setup: it has {len(saved)} {group} variables, "
                    f"this run has {len(variables)}. Use another backup_dir or remove it."
                )
            for i, (variable, (name, shape, _)) in enumerate(zip(variables, saved)):
                if list(variable.shape) != shape:
                    raise SnapshotError(
                        f"{where} was written by a different setup: {group} variable {i} ({name}) has "
                        f"shape {shape} in the snapshot but {list(variable.shape)} here ({_describe(variable)[0]})"
                    )
        for group, saved in saved_layout.items():
            if group not in groups and saved:
                raise SnapshotError(f"{where} has {group} variables this run does not have")
        for group, variables in groups.items():
            for i, variable in enumerate(variables):
                variable.assign(self.arrays[f"{group}/{i}"])
        rng = self.state["rng"]
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, self.arrays["rng/numpy"], pos, has_gauss, cached))
        try:
            trainer._load_run_state(self.state)
        except (ConfigError, PluginError):
            raise
        except Exception as exc:  # a plugin refused its state (a path outside its directory, a wrong type)
            raise SnapshotError(f"{where} holds a run state this run refuses: {type(exc).__name__}: {exc}") from exc
