"""TensorBoard event files for corebus runs, laid out like ``keras.callbacks.TensorBoard``."""

from __future__ import annotations

import base64
import functools
import itertools
import json
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from corebus import (
    LOGGER_FLUSH_SECONDS,
    Cadence,
    ConfigError,
    LogSink,
    PendingPoints,
    Spool,
    check_writable,
    hookimpl,
    replay_spool,
    require_module,
)

log = logging.getLogger("corebus")

SPOOL_NAME = "tensorboard.spool.jsonl"
HISTOGRAM_BUCKETS = 30  # tf.summary.histogram's default


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
        check_writable(self.log_dir, "TensorBoardLogger")
        self.histogram_freq = histogram_freq
        self.write_graph = bool(write_graph)
        self.write_steps_per_second = bool(write_steps_per_second)
        self.update_freq = update_freq
        self.profile_batch = _profile_window(profile_batch)
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
        self._sink: LogSink | None = None
        self._files: _EventFiles | None = None
        self._training = False
        self._pending: list[dict[str, Any]] = []
        self._resumed = False
        self._points = PendingPoints()
        self._graph_pending = False
        self._profiler = "idle"  # -> "running" -> "done" (or "done" when it could not start)
        self._call_steps = 1
        self._warned_no_gradients = False
        self.hparams = bool(hparams)

    def get_config(self) -> dict[str, Any]:
        return {
            "log_dir": os.path.abspath(self.log_dir),
            "histogram_freq": self.histogram_freq,
            "write_graph": self.write_graph,
            "write_steps_per_second": self.write_steps_per_second,
            "update_freq": self.update_freq,
            "profile_batch": list(self.profile_batch or (0, 0)),
            "shutdown_timeout": self.shutdown_timeout,
            "write_gradients": self.write_gradients,
            "write_grad_norm": self.write_grad_norm,
            "hparams": self.hparams,
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
        # Held until the first write opens the sink: a snapshot restored later in this hook
        # (BackupAndRestore) may still point log_dir at the run being resumed.
        self._points = PendingPoints()
        self._pending = [_text("run_params", 0, "```\n" + json.dumps(trainer.run_params(), indent=2) + "\n```")]
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
        for record in self.batch_log_cadence.picks(records):
            self._points.add(record.step, record.logs, record.time)  # read at hand-off (PendingPoints)
        if self._points:
            self._hand_over_points()

    @hookimpl
    def on_log(self, trainer, logs):  # epoch records (batch records come to on_log_steps)
        self._write_graph_once(trainer)
        epoch = trainer.epoch
        train = {f"epoch_{k}": float(v) for k, v in logs.items() if not k.startswith("val_")}
        if not self.write_steps_per_second:
            train.pop("epoch_steps_per_second", None)
        self._put(_scalars("train", epoch, train))
        val = {f"epoch_{k[4:]}": float(v) for k, v in logs.items() if k.startswith("val_")}
        if val:
            self._put(_scalars("validation", epoch, val))
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            self._put_weights(trainer.model, epoch)
            if "values" in self.gradient_taps:
                self._put_gradients(trainer, epoch)

    @hookimpl
    def on_test_end(self, trainer, logs):
        if trainer.optimizer is not None and logs:
            values = {f"evaluation_{k}_vs_iterations": float(v) for k, v in logs.items()}
            self._put(_scalars("validation", trainer.global_step, values))
        if not self._training:  # a standalone evaluate: nothing else will close the sink
            self._close()

    @hookimpl
    def on_checkpoint_saved(self, filepath, step, metadata):
        text = f"`{os.fspath(filepath)}` " + json.dumps(metadata, default=str)
        self._put(_text("checkpoints", step, text))

    @hookimpl
    def on_train_end(self, trainer):
        self._finish(trainer, "FINISHED")

    @hookimpl
    def on_exception(self, trainer, exception):
        if isinstance(exception, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, a stop signal (corebus.Preempted)
            self._finish(trainer, "KILLED")
        else:
            self._finish(trainer, f"FAILED ({type(exception).__name__}: {exception})")

    def state_dict(self) -> dict[str, Any]:
        # Taken for a run snapshot: the points of the steps it holds are written first (or
        # spooled), so a kill after the snapshot loses none of them.
        if self._sink is not None:
            if self._points:
                self._hand_over_points()
            if not self._sink.flush(self.shutdown_timeout):
                log.warning(
                    "TensorBoardLogger: points not written within %.0f s of a snapshot; a kill now may lose them",
                    self.shutdown_timeout,
                )
        return {"log_dir": self.log_dir}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_dir = state["log_dir"]
        # The interrupted process may have written steps after its snapshot: not twice.
        self._resumed = True

    # ---------------------------------------------------------------- delivery

    @classmethod
    def replay_spool(cls, path: str | os.PathLike) -> int:
        """Write the records of a spool into the event files beside it; returns how many."""
        require_module("tensorboard", extra="tensorboard", what="TensorBoardLogger")
        files = _EventFiles(Path(path).parent)
        try:
            return replay_spool(path, files.write, what="TensorBoardLogger")
        finally:
            files.close()

    def _write_graph_once(self, trainer: Any) -> None:
        if self._graph_pending:  # at the first record: the model is built (a subclassed one at its first step)
            self._graph_pending = False
            for record in _graph_records(trainer.model):
                self._put(record)

    def _hand_over_points(self) -> None:
        for step, _, values in self._points.take():
            self._put(_scalars("train", step, {f"batch_{name}": value for name, value in values.items()}))

    def _put(self, record: dict[str, Any]) -> None:
        if self._points:  # keep the order: batch points logged before come first
            self._hand_over_points()
        if self._sink is None:
            self._files = _EventFiles(self.log_dir, skip_written=self._resumed)
            spool = Spool(Path(self.log_dir) / SPOOL_NAME, {"plugin": "tensorboard", "config": self.get_config()})
            self._sink = LogSink(
                "tensorboard",
                self._files.write,
                spool=spool,
                flush_interval=LOGGER_FLUSH_SECONDS,
                shutdown_timeout=self.shutdown_timeout,
            )
            for pending in self._pending:
                self._sink.put(pending)
            self._pending = []
        self._sink.put(record)

    def _put_weights(self, model: Any, epoch: int) -> None:
        # Weights change with the next step, so they are copied (and bucketed) here.
        histograms, norms = {}, {}
        for layer in model.layers:
            for weight in layer.weights:
                name = weight.path.replace(":", "_")
                values = np.asarray(weight.numpy(), dtype=np.float64).reshape(-1)
                histograms[f"{name}/histogram"] = _buckets(values).tolist()
                norms[f"{name}/norm"] = float(np.linalg.norm(values))
        self._put({"type": "histograms", "run": "train", "step": epoch, "values": histograms})
        self._put(_scalars("train", epoch, norms))

    def _put_gradients(self, trainer: Any, epoch: int) -> None:
        pipeline = trainer.gradient_pipeline
        pipeline.capture_gradients(False)
        histograms, norms = {}, {}
        for optimizer in trainer.optimizers:
            prefix = "" if optimizer == "default" else f"{optimizer}/"
            for variable, gradient in pipeline.captured_gradients(optimizer):
                name = prefix + variable.path.replace(":", "_")
                values = np.asarray(gradient, dtype=np.float64).reshape(-1)
                histograms[f"{name}/gradient_histogram"] = _buckets(values).tolist()
                norms[f"{name}/gradient_norm"] = float(np.linalg.norm(values))
        if histograms:
            self._put({"type": "histograms", "run": "train", "step": epoch, "values": histograms})
            self._put(_scalars("train", epoch, norms))
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
        self._put(_text("run_status", trainer.global_step, status))
        self._training = False
        self._close()
        if self.hparams:  # the HParams dashboard session, written last (tensorboard_hparams.py)
            from .tensorboard_hparams import write_hparams

            write_hparams(self.log_dir, trainer)

    def _close(self) -> None:
        if self._sink is not None:
            self._sink.close(self.shutdown_timeout)
            self._files.close()
        self._sink = self._files = None

    def _start_profiler(self, first_step: int) -> None:
        import tensorflow as tf

        try:
            tf.profiler.experimental.start(os.path.join(self.log_dir, "train"))
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


class _EventFiles:
    """The ``train`` and ``validation`` event files of one log_dir, used from one thread.

    Events are built as protobufs and framed as TFRecords in plain Python, the format
    ``tf.summary`` writes (same tags, plugin metadata and tensors). TensorFlow's summary ops
    would run eager ops, about half a millisecond per scalar, on a thread that shares the
    interpreter lock with the training loop.
    """

    _serial = itertools.count()  # two writers opened in the same second get different files

    def __init__(self, log_dir: str | os.PathLike, skip_written: bool = False):
        """``skip_written``: for a resumed run, values already in the event files (same run,
        tag and step: written by the interrupted process after its snapshot) are not written again."""
        self.log_dir = os.fspath(log_dir)
        self._writers: dict[str, Any] = {}
        self._written = _written(self.log_dir) if skip_written else None

    def write(self, records: list[dict[str, Any]]) -> None:
        from tensorboard.compat.proto import event_pb2

        # Open every file first, so a failure (a full disk) leaves no half-written batch.
        for run in sorted({record["run"] for record in records}):
            if run not in self._writers:
                self._writers[run] = self._open(os.path.join(self.log_dir, run))
        written = self._written
        for record in records:
            step = int(record.get("step", 0))
            event = event_pb2.Event(wall_time=time.time(), step=step)
            if record["type"] == "graph":
                if written is not None and (record["run"], _GRAPH, step) in written:
                    continue
                event.graph_def = base64.b64decode(record["graph_def"])
            else:
                values = _summary_values(record)
                if written is not None:
                    values = [v for v in values if (record["run"], v.tag, step) not in written]
                    if not values:
                        continue
                event.summary.value.extend(values)
            self._writers[record["run"]].write(event.SerializeToString())
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    @classmethod
    def _open(cls, directory: str) -> Any:
        import tensorflow as tf
        from tensorboard.compat.proto import event_pb2

        os.makedirs(directory, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(cls._serial)}.v2"
        )
        # TFRecord framing in C++: TensorBoard's own RecordWriter computes its CRC32C checksums
        # in plain Python, 15 µs a record of interpreter-lock time taken from the training loop.
        writer = tf.io.TFRecordWriter(os.path.join(directory, name))
        writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        return writer


_GRAPH = "\0graph"  # the op graph event has no tag


def _written(log_dir: str) -> set[tuple[str, str, int]]:
    """``(run, tag, step)`` of every value in the event files under ``log_dir`` (a torn last
    record of a killed writer ends its file's reading)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    written = set()
    for path in sorted(Path(log_dir).glob("*/events.out.tfevents.*")):
        run = path.parent.name
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("graph_def"):
                written.add((run, _GRAPH, event.step))
            for value in event.summary.value:
                written.add((run, value.tag, event.step))
    return written


def _summary_values(record: dict[str, Any]) -> list[Any]:
    """The ``Summary.Value`` protos ``tf.summary`` would write for one record."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.histogram import metadata as histogram_metadata
    from tensorboard.plugins.text.summary_v2 import text_pb
    from tensorboard.util import tensor_util

    kind, values = record["type"], record.get("values", {})
    if kind == "scalars":
        return [_scalar_value(tag, number) for tag, number in values.items()]
    if kind == "text":
        return [value for tag, text in values.items() for value in text_pb(tag, text).value]
    if kind == "histograms":
        metadata = histogram_metadata.create_summary_metadata(display_name=None, description=None)
        return [
            summary_pb2.Summary.Value(
                tag=tag, metadata=metadata, tensor=tensor_util.make_tensor_proto(np.asarray(buckets, np.float64))
            )
            for tag, buckets in values.items()
        ]
    if kind == "keras_model":
        metadata = summary_pb2.SummaryMetadata(  # what Keras writes for its conceptual graph
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="graph_keras_model", content=b"1")
        )
        return [
            summary_pb2.Summary.Value(
                tag="keras",
                metadata=metadata,
                tensor=tensor_util.make_tensor_proto(np.array(record["json"], dtype=object)),
            )
        ]
    raise ValueError(f"unknown TensorBoard record type {kind!r}")


def _scalar_value(tag: str, number: float) -> Any:
    """``tensorboard.summary.scalar_pb(tag, number).value[0]``, the same bytes, built directly:
    that goes through numpy and costs 20 µs of interpreter-lock time a scalar, this about 3."""
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(), float_val=[float(number)]
    )
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=_scalar_metadata())


@functools.cache
def _scalar_metadata() -> Any:
    from tensorboard.compat.proto import summary_pb2

    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def _scalars(run: str, step: int, values: dict[str, float]) -> dict[str, Any]:
    return {"type": "scalars", "run": run, "step": int(step), "values": values}


def _text(tag: str, step: int, text: str) -> dict[str, Any]:
    return {"type": "text", "run": "train", "step": int(step), "values": {tag: text}}


def _buckets(data: np.ndarray, count: int = HISTOGRAM_BUCKETS) -> np.ndarray:
    """``tf.summary.histogram``'s buckets ([left, right, count] rows), computed in numpy."""
    data = data[np.isfinite(data)]
    if data.size == 0:
        return np.zeros((count, 3))
    low, high = data.min(), data.max()
    if low == high:
        counts = np.zeros(count)
        counts[-1] = data.size
        return np.stack([np.full(count, high), np.full(count, high), counts], axis=1)
    indices = np.minimum(np.floor((data - low) / ((high - low) / count)).astype(np.int64), count - 1)
    edges = np.linspace(low, high, count + 1)
    edges[-1] = high
    return np.stack([edges[:-1], edges[1:], np.bincount(indices, minlength=count).astype(np.float64)], axis=1)


def _graph_records(model: Any) -> list[dict[str, Any]]:
    """The conceptual graph (model JSON, as Keras writes it) and the forward pass's op graph."""
    import tensorflow as tf

    records = []
    if type(model).__name__ in ("Functional", "Sequential"):
        try:
            records.append({"type": "keras_model", "run": "train", "step": 0, "json": model.to_json()})
        except Exception as exc:  # as Keras: a model that cannot serialise still trains
            warnings.warn(f"Model failed to serialize as JSON. Ignoring... {exc}", stacklevel=2)
    inputs = getattr(model, "inputs", None)
    if inputs:
        try:
            specs = [tf.TensorSpec(tensor.shape, tensor.dtype) for tensor in inputs]
            forward = tf.function(lambda *xs: model(xs[0] if len(xs) == 1 else list(xs), training=False))
            graph_def = forward.get_concrete_function(*specs).graph.as_graph_def()
            encoded = base64.b64encode(graph_def.SerializeToString()).decode()
            records.append({"type": "graph", "run": "train", "graph_def": encoded})
        except Exception as exc:
            log.warning("TensorBoardLogger: could not trace the model's graph: %s", exc)
    return records


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
