"""TensorBoard event files for corebus runs, laid out like ``keras.callbacks.TensorBoard``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from corebus import Cadence, ConfigError, hookimpl
from corebus.kit import (
    LoggerOutbox,
    LogSink,
    OutboxTarget,
    check_number,
    check_remote_writable,
    check_writable,
    is_remote,
    read_spool,
    require_module,
    run_status,
    step_points,
)

from .tensorboard_events import (
    MIRROR,
    EventFiles,
    buckets,
    download_missing,
    event_writer,
    graph_records,
    mirror,
    scalars,
    staging_for,
    text_record,
)

log = logging.getLogger("corebus")


class TensorBoardLogger:
    """``keras.callbacks.TensorBoard`` as a corebus logger: same directories, same tags.

    Writes ``<log_dir>/train`` and ``<log_dir>/validation`` event files that dashboards built on
    Keras's callback read unchanged:

    - ``epoch_<metric>`` (train metrics and ``epoch_learning_rate`` in ``train/``, ``val_*``
      metrics without the prefix in ``validation/``) at step = epoch index, as Keras does;
    - ``evaluation_<metric>_vs_iterations`` in ``validation/`` after every evaluation, at the
      global optimizer step;
    - ``batch_<metric>`` in ``train/`` when ``update_freq`` is an integer N (or ``"batch"``,
      i.e. 1), at the global optimizer step, whenever the updates of a train call cross a
      multiple of N. Keras counts compiled calls instead; with ``steps_per_execution=1`` and
      no gradient accumulation both are the same steps. Beside Keras's tags,
      ``batch_learning_rate``: the rate after that step's update;
    - with ``histogram_freq=N``, every N epochs: ``<weight.path>/histogram`` for every layer
      weight (Keras's tag and buckets) plus a ``<weight.path>/norm`` scalar (its L2 norm), and,
      with ``write_gradients=True`` (default), ``<weight.path>/gradient_histogram`` and
      ``<weight.path>/gradient_norm`` of the gradients of the epoch's last update (copied inside
      the compiled step by the gradient pipeline, before clipping; named optimizers of a custom
      step get ``<optimizer>/`` in front);
    - ``batch_grad_norm`` with the batch metrics (``write_grad_norm=True``; off by default: it
      adds a norm over every gradient to each step, ~3 % on a small MLP): the global norm of
      each logged update's gradients, from the gradient pipeline (no extra host fetch);
    - with ``write_graph=True``: the ``keras`` conceptual graph of Functional and Sequential
      models (as Keras) and the op graph of the model's forward pass where the model has
      symbolic ``inputs``;
    - text summaries ``run_params`` (``trainer.run_params()`` as JSON, step 0),
      ``checkpoints`` (every ``on_checkpoint_saved``) and ``run_status`` (``FINISHED``,
      ``FAILED (<error>)`` or ``KILLED`` for ``KeyboardInterrupt``). Inside ``model.fit`` there
      is no exception hook (Keras has none), so the status is only written on a normal end.

    ``write_steps_per_second=True`` adds ``epoch_steps_per_second`` (Keras also writes a
    per-batch rate; corebus does not). ``profile_batch=(a, b)`` (or ``a`` for ``(a, a)``; ``0``
    disables) runs the TensorFlow profiler over global steps ``a``..``b`` into ``train/``; the
    profiler starts and stops between compiled calls, so with ``steps_per_execution > 1`` the
    window is rounded out to whole calls (``profiled_steps`` says which steps it covered).
    ``hparams=True`` writes the run params and the final / best metrics as an HParams dashboard
    session at the end (see ``corebus.integrations.tensorboard_hparams``).
    Keras's ``write_images`` and embeddings are not supported. Batch values are each step's
    own values (the loss of that batch), not Keras's running means, where the engine can
    measure them (``on_log``); inside ``model.fit`` they are Keras's running means.

    Summaries are written by a :class:`corebus.LogSink` worker thread, never on the training
    thread (which only copies weights for histograms and traces the graph once). Records that
    cannot be written (full disk...) are spooled to ``<log_dir>/tensorboard.spool.jsonl``;
    ``corebus sync <log_dir>`` writes them later. ``shutdown_timeout`` bounds how long the end
    of ``fit`` waits for the writer. A resumed run (``load_state_dict``) keeps writing into the
    original ``log_dir``. Under ``tf.distribute`` only the chief should log.

    ``log_dir`` may be an object-store URL (``s3://bucket/prefix``; credentials from the
    environment, see ``corebus.kit.check_remote_writable``): it is checked before training, the
    event files are written to a local staging directory (``staging_dir``, default a folder per
    URL under the system's temp dir; the spool sits beside them) and uploaded, new or changed
    files only, at every epoch end and snapshot (by the writer thread) and at the end of ``fit``.
    A run resumed on another machine first downloads the event files already in the store.
    """

    runs_on = "chief"  # under tf.distribute: one writer, not one per worker

    # A failing logger never stops training: one warning, then off after 5 failures in a row.
    error_policy = "disable"
    max_failures = 5

    def __init__(
        self,
        log_dir: str | os.PathLike = "./corebus-runs/tensorboard",
        histogram_freq: int = 0,
        write_graph: bool = True,
        write_steps_per_second: bool = False,
        update_freq: str | int = "epoch",
        profile_batch: int | str | tuple[int, int] = 0,
        shutdown_timeout: float = 30.0,
        write_gradients: bool = True,
        write_grad_norm: bool = False,
        hparams: bool = False,
        staging_dir: str | os.PathLike | None = None,
    ):
        require_module("tensorboard", extra="tensorboard", what="TensorBoardLogger")
        update_freq = 1 if update_freq == "batch" else update_freq
        if update_freq != "epoch" and not (isinstance(update_freq, int) and update_freq >= 1):
            raise ConfigError(
                f'TensorBoardLogger: update_freq={update_freq!r} must be "epoch", "batch" or an integer >= 1'
            )
        if not isinstance(histogram_freq, int) or histogram_freq < 0:
            raise ConfigError(
                f"TensorBoardLogger: histogram_freq={histogram_freq!r} must be an integer >= 0 (0 disables)"
            )
        self.log_dir = os.fspath(log_dir)
        self.staging_dir = None if staging_dir is None else os.path.abspath(os.fspath(staging_dir))
        if is_remote(self.log_dir):  # a missing bucket or refused credentials: one error now
            check_remote_writable(self.log_dir, "TensorBoardLogger")
        check_writable(self._local_dir(), "TensorBoardLogger")
        self.histogram_freq = histogram_freq
        self.write_graph = bool(write_graph)
        self.write_steps_per_second = bool(write_steps_per_second)
        self.update_freq = update_freq
        self.profile_batch = _profile_window(profile_batch)
        check_number("TensorBoardLogger", "shutdown_timeout", shutdown_timeout, at_least=0, unit="seconds")
        self.shutdown_timeout = float(shutdown_timeout)
        self.write_gradients = bool(write_gradients)
        # What the gradient pipeline computes inside the step for us (see GradientPipeline).
        self.write_grad_norm = bool(write_grad_norm)
        self.gradient_taps = set()
        if self.write_grad_norm and update_freq != "epoch":
            self.gradient_taps.add("norm")
        if self.write_gradients and histogram_freq:
            self.gradient_taps.add("values")
        self.profiled_steps: tuple[int, int] | None = None
        self.batch_log_cadence = None if update_freq == "epoch" else Cadence.every_n(update_freq)
        if not (self.profile_batch or "values" in self.gradient_taps):
            # Not needed in this configuration: unsubscribed, so a step calls no hook of ours
            # (the bus registers only methods; a hook no plugin implements costs nothing).
            self.on_train_batch_begin = self.on_train_batch_end = None
        self._outbox = LoggerOutbox(
            "tensorboard", self._open_files, owner="TensorBoardLogger", shutdown_timeout=self.shutdown_timeout
        )
        self._files: EventFiles | None = None
        self._training = False
        self._resumed = False
        self._graph_pending = False
        self._profiler = "idle"  # -> "running" -> "done" (or "done" when it could not start)
        self._call_steps = 1
        self._warned_no_gradients = False
        self.hparams = bool(hparams)

    @property
    def sink(self) -> LogSink | None:
        """The sink of the last run opened (kept after the run for its ``stats``)."""
        return self._outbox.sink

    def get_config(self) -> dict[str, Any]:
        return {
            "log_dir": self.log_dir if is_remote(self.log_dir) else os.path.abspath(self.log_dir),
            "histogram_freq": self.histogram_freq,
            "write_graph": self.write_graph,
            "write_steps_per_second": self.write_steps_per_second,
            "update_freq": self.update_freq,
            "profile_batch": list(self.profile_batch or (0, 0)),
            "shutdown_timeout": self.shutdown_timeout,
            "write_gradients": self.write_gradients,
            "write_grad_norm": self.write_grad_norm,
            "hparams": self.hparams,
            "staging_dir": self.staging_dir,
        }

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def on_train_begin(self, trainer):
        self._training = True
        self._graph_pending = self.write_graph
        self._profiler = "idle"
        # Updates per compiled call, to know whether the next call reaches the profiler window
        # (afterwards measured on each call).
        per_call = trainer.params.get("steps_per_execution") or getattr(trainer.model, "steps_per_execution", 1)
        self._call_steps = max(1, -(-int(per_call) // trainer.accumulation_steps()))
        # Gradients are captured from the call holding the epoch's last update on: any
        # `accumulation` consecutive micro-batches hold one update, and an epoch whose length
        # is no multiple of it ends inside an accumulation window (its last call updates nothing).
        self._capture_from_end = int(per_call) + trainer.accumulation_steps() - 1
        # Held until the first write opens the files: a snapshot restored later in this hook
        # (BackupAndRestore) may still point log_dir at the run being resumed.
        params = "```\n" + json.dumps(trainer.run_params(), indent=2) + "\n```"
        self._outbox.hold(text_record("run_params", 0, params))
        self._resumed = False  # until a snapshot restore (load_state_dict, later in on_train_begin)

    @hookimpl
    def on_epoch_begin(self, trainer, epoch):
        if "values" in self.gradient_taps and epoch % self.histogram_freq == 0 and not trainer.params.get("steps"):
            trainer.gradient_pipeline.capture_gradients(True)  # unknown length: every update

    @hookimpl
    def on_train_batch_begin(self, trainer, batch):
        steps = trainer.params.get("steps")
        if (
            "values" in self.gradient_taps
            and steps
            and trainer.epoch % self.histogram_freq == 0
            and batch + self._capture_from_end >= steps
        ):
            trainer.gradient_pipeline.capture_gradients(True)  # from the call of the epoch's last update
        window = self.profile_batch
        # The window is in global steps, so a later fit or a resumed run past it never re-profiles.
        if window and self._profiler == "idle" and trainer.global_step < window[1]:
            if trainer.global_step + self._call_steps >= window[0]:
                self._start_profiler(trainer.global_step + 1)

    @hookimpl
    def on_train_batch_end(self, trainer):
        self._call_steps = max(1, trainer.global_step - trainer.previous_global_step)
        if self._profiler == "running" and Cadence.once(self.profile_batch[1]).due_now(trainer):
            self._stop_profiler(trainer.global_step)

    @hookimpl
    def on_log_steps(self, trainer, records):
        self._write_graph_once(trainer)
        if self.batch_log_cadence is None:
            return
        for step, _, values in step_points(records, self.batch_log_cadence):
            self._put(scalars("train", step, {f"batch_{name}": value for name, value in values.items()}))

    @hookimpl
    def on_log(self, trainer, logs):  # epoch records (batch records come to on_log_steps)
        self._write_graph_once(trainer)
        epoch = trainer.epoch
        train = {f"epoch_{k}": float(v) for k, v in logs.items() if not k.startswith("val_")}
        if not self.write_steps_per_second:
            train.pop("epoch_steps_per_second", None)
        self._put(scalars("train", epoch, train))
        val = {f"epoch_{k[4:]}": float(v) for k, v in logs.items() if k.startswith("val_")}
        if val:
            self._put(scalars("validation", epoch, val))
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            self._put_weights(trainer.model, epoch)
            if "values" in self.gradient_taps:
                self._put_gradients(trainer, epoch)
        if is_remote(self.log_dir):  # the epoch's files to the store, on the writer thread
            self._put(dict(MIRROR))

    @hookimpl
    def on_test_end(self, trainer, logs):
        if trainer.optimizer is not None and logs:
            values = {f"evaluation_{k}_vs_iterations": float(v) for k, v in logs.items()}
            self._put(scalars("validation", trainer.global_step, values))
        if not self._training:  # a standalone evaluate: nothing else will close the sink
            self._close()

    @hookimpl
    def on_checkpoint_saved(self, filepath, step, metadata):
        text = f"`{os.fspath(filepath)}` " + json.dumps(metadata, default=str)
        self._put(text_record("checkpoints", step, text))

    @hookimpl
    def on_train_end(self, trainer):
        self._finish(trainer, "FINISHED")

    @hookimpl
    def on_exception(self, trainer, exception):
        status = run_status(exception)  # KILLED for Ctrl-C or a stop signal (corebus.Preempted)
        self._finish(trainer, status if status == "KILLED" else f"{status} ({type(exception).__name__}: {exception})")

    def state_dict(self) -> dict[str, Any]:
        # Taken for a run snapshot: the points of the steps it holds are written first (or
        # spooled), so a kill after the snapshot loses none of them; a remote log_dir gets them
        # uploaded by then too (the writer thread uploads; this waits for it).
        if self._outbox.is_open and is_remote(self.log_dir):
            self._put(dict(MIRROR))
        self._outbox.flush()
        return {"log_dir": self.log_dir}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_dir = state["log_dir"]
        # The interrupted process may have written steps after its snapshot: not twice.
        self._resumed = True

    # ---------------------------------------------------------------- delivery

    @classmethod
    def replay_spool(cls, path: str | os.PathLike) -> int:
        """Write the records of a spool into the event files beside it (and upload them, for a
        remote ``log_dir``); returns how many."""
        require_module("tensorboard", extra="tensorboard", what="TensorBoardLogger")
        url = read_spool(path)[0].get("config", {}).get("log_dir")
        url = url if is_remote(url) else None
        local = Path(path).parent / "events" if url else Path(path).parent
        files = EventFiles(local)
        try:
            return LoggerOutbox.replay(path, event_writer(files, url), owner="TensorBoardLogger")
        finally:
            files.close()
            if url:
                mirror(str(local), url)

    def _write_graph_once(self, trainer: Any) -> None:
        if self._graph_pending:  # at the first record: the model is built (a subclassed one at its first step)
            self._graph_pending = False
            for record in graph_records(trainer.model):
                self._put(record)

    def _put(self, record: dict[str, Any]) -> None:
        self._outbox.put(record)

    def _open_files(self) -> OutboxTarget:
        """The outbox's opener: this run's event files (a resumed run skips what its killed
        predecessor wrote after its snapshot), spooled to ``<log_dir>/tensorboard.spool.jsonl``."""
        local, url = self._local_dir(), self.log_dir if is_remote(self.log_dir) else None
        if url and self._resumed:
            try:
                download_missing(url, local)
            except Exception as exc:  # never a reason to stop training; at worst values repeat
                log.warning("TensorBoardLogger: could not read the event files in %s (%s)", url, exc)
        files = self._files = EventFiles(local, skip_written=self._resumed)
        header = {"plugin": "tensorboard", "config": self.get_config()}
        # A remote log_dir's spool sits beside its staged event files, not among them (not uploaded).
        directory = os.path.dirname(local) if url else local
        return OutboxTarget(event_writer(files, url), directory, "tensorboard", header, close=files.close)

    def _local_dir(self) -> str:
        """Where the event files are written: ``log_dir``, or a remote one's local staging copy."""
        if is_remote(self.log_dir):
            return os.path.join(staging_for(self.log_dir, self.staging_dir), "events")
        return self.log_dir

    def _put_weights(self, model: Any, epoch: int) -> None:
        # Weights change with the next step, so they are copied (and bucketed) here.
        histograms, norms = {}, {}
        for layer in model.layers:
            for weight in layer.weights:
                name = weight.path.replace(":", "_")
                values = np.asarray(weight.numpy(), dtype=np.float64).reshape(-1)
                histograms[f"{name}/histogram"] = buckets(values).tolist()
                norms[f"{name}/norm"] = float(np.linalg.norm(values))
        self._put({"type": "histograms", "run": "train", "step": epoch, "values": histograms})
        self._put(scalars("train", epoch, norms))

    def _put_gradients(self, trainer: Any, epoch: int) -> None:
        pipeline = trainer.gradient_pipeline
        pipeline.capture_gradients(False)
        histograms, norms = {}, {}
        for optimizer in trainer.optimizers:
            prefix = "" if optimizer == "default" else f"{optimizer}/"
            for variable, gradient in pipeline.captured_gradients(optimizer):
                name = prefix + variable.path.replace(":", "_")
                values = np.asarray(gradient, dtype=np.float64).reshape(-1)
                histograms[f"{name}/gradient_histogram"] = buckets(values).tolist()
                norms[f"{name}/gradient_norm"] = float(np.linalg.norm(values))
        if histograms:
            self._put({"type": "histograms", "run": "train", "step": epoch, "values": histograms})
            self._put(scalars("train", epoch, norms))
        elif trainer.accumulation_steps() > 1 and (trainer.params.get("steps") or 0) < trainer.accumulation_steps():
            # An epoch shorter than the accumulation window may hold no update at all.
            log.info("TensorBoardLogger: epoch %d had no optimizer update; no gradient histogram", epoch)
        elif not self._warned_no_gradients:
            self._warned_no_gradients = True
            log.warning(
                "TensorBoardLogger: no gradients to write; inside model.fit compile with "
                "optimizer=callback.wrap_optimizer(...) so the gradient pipeline runs "
                "(or pass write_gradients=False)"
            )

    def _finish(self, trainer: Any, status: str) -> None:
        if self._profiler == "running":
            self._stop_profiler(trainer.global_step)
        self._put(text_record("run_status", trainer.global_step, status))
        self._training = False
        self._outbox.close()
        if self.hparams:  # the HParams dashboard session, written last (tensorboard_hparams.py)
            from .tensorboard_hparams import write_hparams

            write_hparams(self._local_dir(), trainer)
        self._close()

    def _close(self) -> None:
        self._outbox.close()
        self._files = None
        if is_remote(self.log_dir):  # the last upload: on this thread, the run is over
            mirror(self._local_dir(), self.log_dir)

    def _start_profiler(self, first_step: int) -> None:
        import tensorflow as tf

        try:
            tf.profiler.experimental.start(os.path.join(self._local_dir(), "train"))
        except Exception as exc:  # another profiler running: not worth failing the run (Keras)
            log.error("TensorBoardLogger: failed to start the profiler: %s", exc)
            self._profiler = "done"
            return
        self._profiler, self._profile_first = "running", first_step

    def _stop_profiler(self, last_step: int) -> None:
        import tensorflow as tf

        self._profiler = "done"
        self.profiled_steps = (self._profile_first, last_step)
        try:
            tf.profiler.experimental.stop()
        except Exception as exc:
            log.error("TensorBoardLogger: failed to stop the profiler: %s", exc)


def _profile_window(profile_batch: Any) -> tuple[int, int] | None:
    """Keras's ``profile_batch`` rules: ``0`` off, ``n`` -> ``(n, n)``, ``"a,b"`` or ``(a, b)``."""
    message = (
        f"TensorBoardLogger: profile_batch={profile_batch!r} must be a non-negative integer or a pair "
        "(start, stop) of positive integers with start <= stop, e.g. profile_batch=(10, 20)"
    )
    window = profile_batch.split(",") if isinstance(profile_batch, str) else profile_batch
    if not isinstance(window, (tuple, list)):
        window = (window, window)
    try:
        start, stop = (int(v) if isinstance(v, str) else v for v in window)
    except ValueError:
        raise ConfigError(message) from None
    if not all(type(v) is int for v in (start, stop)) or start < 0 or stop < start or (stop > 0 and start == 0):
        raise ConfigError(message)
    return None if stop == 0 else (start, stop)
