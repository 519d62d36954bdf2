"""Exact resume after a crash: periodic run snapshots, restored on start."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from corebus import Cadence, ConfigError, Preempted, hookimpl
from corebus.kit import BackgroundWorker, RunLock, RunSnapshot, check_writable, is_remote

log = logging.getLogger("corebus")


class BackupAndRestore:
    """Like ``keras.callbacks.BackupAndRestore``, but resumes at the exact next step.

    Every ``save_freq`` steps and at every epoch end it writes a run snapshot (weights,
    optimizer, metrics, step counters, LR state, every plugin's ``state_dict()``, data position,
    RNG) into ``backup_dir``; on start it restores the newest valid one. Snapshots are captured on
    the training thread and written on a background thread (``background=True``), at most one at a
    time; the two newest are kept, so a crash during a write leaves the previous one loadable.

    In ``model.fit`` (through ``KerasCallback``) Keras restarts epochs from their first batch,
    so there snapshots are written at epoch ends only and resume is per epoch.

    :param backup_dir: directory for the snapshots (created; must be writable), or a storage URL
        such as ``s3://bucket/prefix``: there each snapshot is uploaded with its manifest last,
        and only a snapshot whose manifest lists every object with its sha256 is restored.
    :param save_freq: ``"epoch"``, or an integer number of global steps between snapshots.
    :param delete_checkpoint: delete the snapshots when training ends normally (Keras default).
    :param background: write snapshots off the training thread.
    """

    # Under tf.distribute every worker restores (the workers must start alike) and the chief
    # alone writes; the backup_dir must be shared by the workers to resume a multi-worker run.
    runs_on = "all"

    controls = {"run.backup"}
    # History records the epoch in its own trylast on_epoch_end; the snapshot must include it.
    # After "report" too: both end the run from an outermost (tryfirst) on_train_end wrapper,
    # and of two such wrappers the one registered later is outside, so backup commits last.
    runs_after = ("history", "report")

    def __init__(
        self, backup_dir: str, save_freq: str | int = "epoch", delete_checkpoint: bool = True, background: bool = True
    ):
        if save_freq != "epoch" and (not isinstance(save_freq, int) or save_freq < 1):
            raise ConfigError(f"BackupAndRestore: save_freq={save_freq!r}; use 'epoch' or a positive number of steps")
        if not backup_dir:
            raise ConfigError("BackupAndRestore: backup_dir is required")
        # A storage URL stays a string: Path would fold "s3://" into "s3:/".
        self.backup_dir: Path | str = backup_dir if is_remote(backup_dir) else Path(backup_dir)
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self.background = background
        self._cadence = Cadence.every_n(save_freq) if isinstance(save_freq, int) else None
        self._worker: BackgroundWorker | None = None
        self.restored_step: int | None = None
        self.snapshots_written = 0
        self._last_path: Path | str | None = None
        self._lock = RunLock(self.backup_dir, "BackupAndRestore")

    @hookimpl(trylast=True)
    def on_train_begin(self, trainer: Any) -> None:
        # trylast: every other plugin has initialised its state (and installed LR schedules)
        # before the snapshot overwrites it with the interrupted run's state.
        check_writable(self.backup_dir, "BackupAndRestore")
        if trainer.is_chief:  # the chief writes; other workers of a multi-worker run only read
            self._lock.acquire()
            # Holding the lock, no live writer is left: a temporary snapshot here is a dead one's.
            for tmp in RunSnapshot.remove_leftovers(self.backup_dir):
                log.warning("BackupAndRestore: removed %s, left by a snapshot write that never finished", tmp)
        if self._cadence is not None and not trainer.supports_mid_epoch_resume:
            log.warning("BackupAndRestore: model.fit resumes per epoch; snapshots at epoch ends only")
        # The newest snapshot that loads and restores; a malformed or refused one is named in a
        # warning and the one before it is taken.
        snapshot = RunSnapshot.restore_latest(self.backup_dir, trainer)
        if snapshot is not None:
            self.restored_step = trainer.global_step
            log.info("BackupAndRestore: resumed from %s at step %d", snapshot.path, trainer.global_step)
            epochs = (getattr(trainer, "params", None) or {}).get("epochs")
            if trainer.stop_training or (epochs is not None and trainer.epoch >= epochs):
                log.warning(
                    "BackupAndRestore: the run in %s had finished training (it was stopped while "
                    "ending); nothing is trained again, the run only ends",
                    self.backup_dir,
                )

    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer: Any) -> None:
        if self._cadence is not None and trainer.supports_mid_epoch_resume and self._cadence.due_now(trainer):
            self._save(trainer)

    @hookimpl(wrapper=True)
    def on_epoch_end(self, trainer: Any) -> Any:
        # A wrapper: the snapshot is taken after every plugin's on_epoch_end (history's trylast
        # one included), and also when one of them raised, so the epoch's training is kept.
        try:
            result = yield
        except BaseException:
            try:
                self._save(trainer)
            except Exception as exc:  # never hide the error that ended the epoch
                log.warning(
                    "BackupAndRestore: snapshot of the failed epoch end not written: %s: %s", type(exc).__name__, exc
                )
            raise
        self._save(trainer)
        return result

    @hookimpl(wrapper=True, tryfirst=True)
    def on_train_end(self, trainer: Any) -> Any:
        # The end of training is a commit: the snapshots go only after every other plugin's
        # on_train_end has returned (loggers closed, report written). A kill before that point
        # leaves the last snapshot, from which the rerun ends the run without training again.
        failed = None
        try:  # the last epoch's snapshot must be on disk before anything else ends
            if self._worker is not None:
                self._worker.flush()
        except Exception as exc:  # let the others end first, then report it
            failed = exc
        result = yield
        self._close()
        if failed is not None:
            raise failed
        if self.delete_checkpoint and trainer.is_chief:
            RunSnapshot.remove_all(self.backup_dir)
        self._lock.release()
        if self.delete_checkpoint and trainer.is_chief and isinstance(self.backup_dir, Path):
            with contextlib.suppress(OSError):  # as Keras: no empty backup_dir left behind
                self.backup_dir.rmdir()
        return result

    @hookimpl(tryfirst=True)
    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        try:
            if isinstance(exception, Preempted):  # stopped at a step boundary: commit that step
                self.snapshot_now(trainer)
        finally:
            self._end_after_exception()

    def _end_after_exception(self) -> None:
        try:
            self._close()  # keep the snapshots: they are what the next start resumes from
        finally:
            self._lock.release()

    def snapshot_now(self, trainer: Any) -> Path | str | None:
        """Write a snapshot of the run as it is now and wait until it is on disk.

        For a stop requested between steps (e.g. SIGTERM answered at the next step boundary):
        the rerun resumes exactly at the step after this one. Returns the snapshot's path, or
        ``None`` on a worker that is not the chief (only the chief writes).
        """
        if not trainer.is_chief:
            return None
        self._save(trainer)
        if self._worker is not None:
            self._worker.flush()
        return self._last_path

    def _save(self, trainer: Any) -> None:
        if not trainer.is_chief:
            return
        if self._worker is not None:
            self._worker.flush()  # at most one snapshot in flight
        snapshot = RunSnapshot.capture(trainer)
        self.snapshots_written += 1
        self._last_path = (
            f"{self.backup_dir.rstrip('/')}/{snapshot.directory_name}"
            if isinstance(self.backup_dir, str)
            else self.backup_dir / snapshot.directory_name
        )
        # In model.fit (no exception hook: a process may die of an error right after this
        # epoch end) the snapshot is on disk before training goes on, as Keras's own backup is.
        if not self.background or not trainer.supports_mid_epoch_resume:
            snapshot.write(self.backup_dir)
            return
        if self._worker is None:
            self._worker = BackgroundWorker("backup", max_pending=1)
        self._worker.submit(lambda: snapshot.write(self.backup_dir))

    def _close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.close()
