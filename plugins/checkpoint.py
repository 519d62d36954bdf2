"""Save the model or its weights during training, like ``keras.callbacks.ModelCheckpoint``.

Same arguments and semantics as Keras, plus what long runs need: ``save_top_k`` (keep the k
best files, delete the rest), ``save_last`` (a ``last.keras`` to resume from), atomic writes
(a killed process never leaves a partial file under the final name), optional background
writing, and an ``on_checkpoint_saved`` event so loggers can upload each file.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import string
from collections import deque
from pathlib import Path
from typing import Any

from corebus import BackgroundWorker, Cadence, ConfigError, Monitor, RunLock, atomic_path, check_writable, hookimpl
from corebus.kit import check_number, delete_path, is_remote

log = logging.getLogger("corebus")


class ModelCheckpoint:
    """Save the model (``.keras``, or legacy ``.h5``) or its weights (``.weights.h5``).

    :param filepath: where to save; may hold ``{epoch}`` (1-based, as in Keras), ``{step}``
        (global optimizer step), ``{batch}`` (1-based, with an integer ``save_freq``) and any
        logged metric, with format specs: ``"ckpt/{epoch:02d}-{val_loss:.2f}.keras"``. A storage
        URL (``s3://bucket/ckpt/{epoch}.keras``) works too: each file is saved locally and
        uploaded in one PUT, so a reader sees a whole checkpoint or none.
    :param monitor: metric deciding "best" (``save_best_only``, ``save_top_k``).
    :param verbose: 1 prints a line for every decision, as Keras does.
    :param save_best_only: save only when ``monitor`` improves on the best value so far.
    :param save_weights_only: ``model.save_weights`` (path must end ``.weights.h5``) instead
        of ``model.save`` (path must end ``.keras`` or ``.h5``).
    :param mode: ``"min"``, ``"max"`` or ``"auto"`` (from the metric, as in Keras).
    :param save_freq: ``"epoch"``, or an integer N: save each time the global step crosses a
        multiple of N (exact under ``steps_per_execution`` and after a resume).
    :param initial_value_threshold: a value the monitored metric must beat to be saved.
    :param save_top_k: keep only the k best files by ``monitor`` (a value entering the top k
        is saved, the file falling out is deleted). With ``save_best_only`` only improvements
        are saved, and the k most recent improvements are kept.
    :param save_last: at every save point also write ``last.keras`` (or ``last.h5`` /
        ``last.weights.h5``) beside the checkpoints, whether or not the metric improved.
    :param background: snapshot the variables on the training thread and write the file on
        a worker thread (at most one write pending); ``fit`` waits for it at the end and
        re-raises its errors.
    :param strict: a monitored metric missing from the logs is an error, not a warning.

    ::

        ModelCheckpoint("ckpt/{epoch:02d}-{val_loss:.3f}.keras", save_top_k=3, save_last=True)

    Where it differs from Keras, and why: bad arguments and an unwritable directory raise
    :class:`corebus.ConfigError` here (the directory is created now), not at the first save;
    ``save_freq=N`` counts global steps by boundary crossing (one save per multiple of N
    crossed) where Keras resets a batch counter, which drifts under ``steps_per_execution``;
    a full model to ``*.weights.h5`` is refused rather than written as legacy HDF5. When the
    monitored metric is missing, ``save_best_only`` saves anyway (as Keras does), but
    ``save_top_k`` skips the save, since it cannot rank it. A ``filepath`` placeholder naming a
    key the logs do not have (``{val_acc}`` for ``val_accuracy``) is a ``ConfigError`` listing the
    available keys and the close match, at the first epoch end (first batch with ``save_freq=N``)
    where Keras raises a bare ``KeyError``.

    After each file is in place, ``on_checkpoint_saved`` fires with its final path, the step it
    holds and ``metadata = {"kind": "model" | "weights", "monitor", "value", "epoch" (0-based),
    "last": bool}``.
    """

    runs_on = "chief"  # under tf.distribute: one writer, not one per worker

    def __init__(
        self,
        filepath: str | os.PathLike,
        monitor: str | None = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        save_top_k: int | None = None,
        save_last: bool = False,
        background: bool = False,
        strict: bool = False,
    ):
        self.filepath = os.fspath(filepath)
        self.verbose = verbose
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.save_freq = save_freq
        self.save_top_k = save_top_k
        self.save_last = bool(save_last)
        self.background = bool(background)
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None if initial_value_threshold is None else float(initial_value_threshold)
        self._threshold = self.best
        self._check_config()
        self._monitor = None if monitor is None else Monitor(monitor, mode, owner="ModelCheckpoint", strict=strict)
        self._cadence = None if save_freq == "epoch" else Cadence.every_n(save_freq)
        self._top_k: list[tuple[str, float]] = []  # kept files, best first
        self._epoch = 0
        self._last_saved: dict[str, Any] = {}
        self._worker: BackgroundWorker | None = None
        self._shadow: tuple[str, Any, list] | None = None
        self._done: deque = deque()  # completed writes, announced on the training thread
        self._placeholders_checked = False
        # Fail before training, not at the first save: Keras would only fail there.
        check_writable(self._directory, "ModelCheckpoint")
        # One run owns the checkpoint directory (the file itself when no directory is given).
        in_cwd = not is_remote(self.filepath) and Path(self.filepath).parent == Path(".")
        self._lock = RunLock(self.filepath if in_cwd else self._directory, "ModelCheckpoint", directory=not in_cwd)

    def _check_config(self) -> None:
        path, where = self.filepath, f"ModelCheckpoint(filepath={self.filepath!r})"
        if self.save_weights_only and not path.endswith(".weights.h5"):
            raise ConfigError(f"{where}: save_weights_only=True needs a path ending in '.weights.h5'")
        if not self.save_weights_only and (path.endswith(".weights.h5") or not path.endswith((".keras", ".h5"))):
            raise ConfigError(
                f"{where}: a full model is saved to a path ending in '.keras' (or legacy '.h5'); "
                "for weights use save_weights_only=True and '.weights.h5'"
            )
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(path) if name is not None}
        except ValueError as exc:
            raise ConfigError(f"{where}: bad placeholder: {exc}") from exc
        if "" in fields or any(name.isdigit() for name in fields):
            raise ConfigError(f"{where}: every placeholder needs a name, such as {{epoch}} or {{val_loss:.4f}}")
        if self.save_freq != "epoch" and not _positive_int(self.save_freq):
            raise ConfigError(
                f"ModelCheckpoint: save_freq={self.save_freq!r}; use 'epoch' or a positive number of steps"
            )
        if (self.save_best_only or self.save_top_k is not None) and self.monitor is None:
            raise ConfigError(
                "ModelCheckpoint: save_best_only / save_top_k rank checkpoints by a metric; "
                "pass monitor='val_loss' (or another)"
            )
        check_number("ModelCheckpoint", "save_top_k", self.save_top_k, at_least=1, integer=True, allow_none=True)
        if (self.save_top_k or 0) > 1 and not fields:
            raise ConfigError(
                f"{where}: save_top_k={self.save_top_k} keeps several files, so the path needs "
                "a placeholder such as {epoch} or {val_loss:.4f}"
            )

    @property
    def _directory(self) -> Path | str:
        # The part of the directory before any placeholder: it exists whatever the values.
        if is_remote(self.filepath):  # a storage URL stays a string: Path folds "s3://" into "s3:/"
            scheme, rest = self.filepath.split("://", 1)
            parts = rest.split("/")[:-1]
            fixed = parts[: next((i for i, part in enumerate(parts) if "{" in part), len(parts))]
            return f"{scheme}://{'/'.join(fixed)}"
        parts = Path(self.filepath).parent.parts
        fixed = parts[: next((i for i, part in enumerate(parts) if "{" in part), len(parts))]
        return Path(*fixed) if fixed else Path(".")

    @property
    def _last_path(self) -> str:
        suffix = ".weights.h5" if self.save_weights_only else Path(self.filepath).suffix
        if isinstance(self._directory, str):
            return f"{self._directory}/last{suffix}"
        return str(self._directory / f"last{suffix}")

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def on_train_begin(self, trainer):
        self._lock.acquire()
        self._remove_leftovers()
        self._epoch = int(trainer.params.get("initial_epoch", trainer.epoch) or 0)
        if self._monitor is not None:
            try:
                self._monitor.resolve(trainer.model)
            except ConfigError:
                pass  # model.fit builds its metrics at the first step: decide at the first save
        if self.background and self._worker is None:
            self._worker = BackgroundWorker("checkpoint", max_pending=1)

    @hookimpl
    def on_epoch_begin(self, epoch):
        self._epoch = epoch

    # trylast (here and at epoch end): save after every plugin that changes state in the same
    # hook (an LR plateau, a schedule, a stop decision, metrics added to the logs), so the file
    # holds the state training continues from, as when ModelCheckpoint is last in Keras's list.
    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer, batch, logs):
        if self._done:
            self._announce(trainer)
        if self._cadence is not None and not self._placeholders_checked:
            # Step saves format with batch logs: a missing key is an error at the first batch
            # (reading the names fetches nothing), not at the first save, maybe epochs later.
            self._check_placeholders(list(logs or ()), batch=True)
        if self._cadence is not None and self._cadence.due_now(trainer):
            self._save(trainer, self._epoch, batch, logs)

    @hookimpl(trylast=True)
    def on_epoch_end(self, trainer, epoch, logs):
        if self._done:
            self._announce(trainer)
        if self.save_freq == "epoch":
            self._save(trainer, epoch, None, logs)

    @hookimpl
    def on_train_end(self, trainer):
        try:
            self._close(trainer)
        finally:
            self._lock.release()

    @hookimpl
    def on_exception(self, trainer):
        try:
            self._close(trainer)
        finally:
            self._lock.release()

    # ---------------------------------------------------------------- deciding

    def _save(self, trainer: Any, epoch: int, batch: int | None, logs: Any) -> None:
        fields = dict(logs or {})  # on a save step only: one batched fetch of lazy batch logs
        ranked = self.save_best_only or self.save_top_k is not None
        value = self._monitor.value(fields) if ranked else fields.get(self.monitor)
        path = self._format(epoch, batch, trainer.global_step, fields)
        removed: list[str] = []
        save = self._should_save(trainer, epoch, path, value, ranked)
        if save and ranked and value is not None:
            if self.best is None or self._monitor.better(value, self.best):
                self.best = value
            if self.save_top_k is not None:
                self._top_k = [e for e in self._top_k if e[0] != path] + [(path, value)]
                self._top_k.sort(key=lambda e: e[1], reverse=not self._monitor.minimize)
                removed = [p for p, _ in self._top_k[self.save_top_k :]]
                self._top_k = self._top_k[: self.save_top_k]
        if not save and not self.save_last:
            return
        meta = {
            "kind": "weights" if self.save_weights_only else "model",
            "monitor": self.monitor,
            "value": None if value is None else float(value),
            "epoch": epoch,
            "last": False,
        }
        self._last_saved = {"path": path if save else None, "step": trainer.global_step, "epoch": epoch}
        self._write(trainer, path if save else None, removed, trainer.global_step, meta)

    def _should_save(self, trainer: Any, epoch: int, path: str, value: float | None, ranked: bool) -> bool:
        """Keras's ``_should_save_model``, extended with the top-k rule."""
        if not ranked:
            self._say(f"\nEpoch {epoch + 1}: saving model to {path}")
            return True
        if value is None:  # Monitor warned once; Keras saves anyway, a top-k cannot rank it
            return self.save_top_k is None
        self._monitor.resolve(trainer.model)
        best_str = "None" if self.best is None else f"{self.best:.5f}"
        if self.save_best_only:
            good = self._monitor.is_improvement(value, self.best)
        else:
            others = [v for p, v in self._top_k if p != path]
            enters = len(others) < self.save_top_k or self._monitor.better(value, others[-1])
            good = enters and self._monitor.is_improvement(value, self._threshold)
        if good:
            self._say(
                f"\nEpoch {epoch + 1}: {self.monitor} improved from {best_str} to {value:.5f}, saving model to {path}"
            )
        else:
            self._say(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best_str}")
        return good

    def _format(self, epoch: int, batch: int | None, step: int, fields: dict) -> str:
        values = {**fields, "epoch": epoch + 1, "step": step}
        if batch is not None:
            values.setdefault("batch", batch + 1)
        self._check_placeholders(list(fields), batch=batch is not None)
        return self.filepath.format(**values)

    def _check_placeholders(self, keys: list[str], batch: bool) -> None:
        """A placeholder naming a key the logs do not have is a :class:`ConfigError` listing the
        available keys and the close match (Keras raises a bare ``KeyError`` deep in ``fit``)."""
        available = sorted({*keys, "epoch", "step", *(("batch",) if batch else ())})
        names = {_field_root(name) for _, name, _, _ in string.Formatter().parse(self.filepath) if name}
        missing = sorted(names.difference(available))
        self._placeholders_checked = True
        if not missing:
            return
        name = missing[0]
        message = (
            f"ModelCheckpoint(filepath={self.filepath!r}): the placeholder {{{name}}} names a key "
            f"the {'batch' if batch else 'epoch'} logs do not have"
        )
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {{{close[0]}}}?"
        if batch and name.startswith("val_"):
            message += " (validation metrics exist only at epoch ends: use save_freq='epoch')"
        raise ConfigError(f"{message} Available keys: {', '.join(available)}")

    def _say(self, message: str) -> None:
        if self.verbose > 0:
            print(message)

    # ---------------------------------------------------------------- writing

    def _write(self, trainer: Any, path: str | None, removed: list[str], step: int, meta: dict) -> None:
        snapshot = None
        if self._worker is not None:
            try:
                snapshot = self._snapshot(trainer.model)
            except Exception as exc:  # e.g. a subclassed model clone_model cannot rebuild
                log.warning(
                    "ModelCheckpoint: background=True needs a copy of the model (%s); "
                    "saving on the training thread instead",
                    exc,
                )
                self._close(trainer)

        def job() -> None:
            model = trainer.model if snapshot is None else snapshot()
            if path is not None:
                with atomic_path(path) as tmp:
                    self._save_file(model, tmp)
                self._done.append((path, step, meta, removed))
            if self.save_last and path != self._last_path:
                with atomic_path(self._last_path) as tmp:
                    if path is not None and not is_remote(path):
                        shutil.copyfile(path, tmp)
                    else:
                        self._save_file(model, tmp)
                self._done.append((self._last_path, step, {**meta, "last": True}, []))

        if self._worker is None:
            job()
            self._announce(trainer)
        else:
            self._worker.submit(job)

    def _save_file(self, model: Any, path: Path) -> None:
        if self.save_weights_only:
            model.save_weights(str(path))
        else:
            model.save(str(path))

    def _snapshot(self, model: Any) -> Any:
        """Copy every variable now (training thread); return a job loading them into a twin."""
        import keras
        import numpy as np

        # A weights file holds no optimizer state: the twin needs no optimizer either.
        with_optimizer = not self.save_weights_only
        config = model.get_compile_config() if model.compiled and with_optimizer else {}
        key = json.dumps(config, sort_keys=True, default=repr)
        live = _variables(model, with_optimizer)
        shapes = [v.shape for v in live]
        if self._shadow is None or self._shadow[0] != key or [v.shape for v in self._shadow[2]] != shapes:
            # A twin built once (and when the compile config changes, e.g. a new LR schedule):
            # clone_model keeps the layer names, so the files match a direct save.
            twin = keras.models.clone_model(model)
            if config:
                twin.compile_from_config(config)
                if twin.optimizer is not None and not twin.optimizer.built:
                    twin.optimizer.build(twin.trainable_variables)
            twin_vars = _variables(twin, with_optimizer)
            if [v.shape for v in twin_vars] != shapes:
                raise ValueError("keras.models.clone_model did not rebuild the same variables")
            self._shadow = (key, twin, twin_vars)
        _, twin, twin_vars = self._shadow
        values = [np.array(v) for v in live]

        def load() -> Any:
            for variable, value in zip(twin_vars, values):
                variable.assign(value)
            return twin

        return load

    def _announce(self, trainer: Any) -> None:
        """Fire ``on_checkpoint_saved`` for finished writes, on the training thread.

        Files that fell out of the top k are deleted only after the newer file was announced,
        so no listener is told about a file that is already gone.
        """
        while self._done:
            path, step, meta, removed = self._done.popleft()
            self._say(f"\nEpoch {meta['epoch'] + 1}: finished saving model to {path}")
            trainer.bus.call("on_checkpoint_saved", trainer=trainer, filepath=str(path), step=step, metadata=meta)
            kept = {p for p, _ in self._top_k}  # a later save may have written the same name again
            for old in removed:
                if old not in kept:
                    delete_path(old)

    def _close(self, trainer: Any) -> None:
        worker, self._worker = self._worker, None
        try:
            if worker is not None:
                try:
                    worker.flush()  # waits for the pending write; re-raises its error
                finally:
                    worker.close()  # the error was consumed above, so this only stops the thread
        finally:
            self._announce(trainer)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "top_k": [list(entry) for entry in self._top_k],
            "epoch": self._epoch,
            "last_saved": dict(self._last_saved),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A snapshot is data, never instructions: every path in it must lie in this checkpoint's
        # own directory (a file falling out of the top k is deleted), else the state is refused.
        best, top_k, epoch = state["best"], state["top_k"], state["epoch"]
        if best is not None and not _number(best):
            raise ValueError(f"ModelCheckpoint: the snapshot's best value {best!r} is not a number")
        if not isinstance(top_k, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and _number(e[1]) for e in top_k
        ):
            raise ValueError("ModelCheckpoint: the snapshot's top-k list is not a list of [path, value] pairs")
        last_saved = dict(state.get("last_saved") or {})
        for path in [p for p, _ in top_k] + ([last_saved["path"]] if last_saved.get("path") else []):
            self._check_own(path)
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
            raise ValueError(f"ModelCheckpoint: the snapshot's epoch {epoch!r} is not an epoch index")
        self.best = best
        self._top_k = [(str(p), float(v)) for p, v in top_k]
        self._epoch = int(epoch)
        self._last_saved = last_saved

    def _check_own(self, path: Any) -> None:
        if isinstance(self._directory, str):
            own_url = self._directory.rstrip("/") + "/"
            if not isinstance(path, str) or not path.startswith(own_url) or "/../" in path or "/./" in path:
                raise ValueError(
                    f"ModelCheckpoint: the snapshot names {path!r}, outside this checkpoint's location {own_url!r}"
                )
            return
        own = self._directory.resolve()
        if not isinstance(path, str) or not Path(path).resolve().is_relative_to(own):
            raise ValueError(
                f"ModelCheckpoint: the snapshot names {path!r}, outside this checkpoint's directory {str(own)!r}"
            )
        if Path(self.filepath).parent == Path(".") and Path(path).parent != Path("."):
            raise ValueError(f"ModelCheckpoint: the snapshot names {path!r}, not a file of this checkpoint")

    def _remove_leftovers(self) -> None:
        """Temporary files of writes that never finished (the writer died): removed at the start,
        while this run holds the directory. On object storage a save is staged locally: none."""
        directory = self._directory
        if isinstance(directory, str):
            return
        suffix = ".weights.h5" if self.save_weights_only else Path(self.filepath).suffix
        in_cwd = Path(self.filepath).parent == Path(".")
        pattern, prefix = f".*.tmp{suffix}", f".{Path(self.filepath).name[: -len(suffix)]}."
        for tmp in directory.glob(pattern) if in_cwd else directory.rglob(pattern):
            # in the working directory, only this checkpoint's own temporary files
            if tmp.is_file() and (not in_cwd or tmp.name.startswith(prefix)):
                tmp.unlink(missing_ok=True)
                log.warning("ModelCheckpoint: removed %s, left by a save that never finished", tmp)


def _field_root(name: str) -> str:
    """``val_loss`` of ``val_loss``, ``val_loss.real`` or ``val_loss[0]``."""
    return name.split(".", 1)[0].split("[", 1)[0]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _variables(model: Any, with_optimizer: bool = True) -> list:
    compiled = with_optimizer and getattr(model, "compiled", False)
    optimizer = getattr(model, "optimizer", None) if compiled else None
    return list(model.variables) + (list(optimizer.variables) if optimizer is not None else [])
