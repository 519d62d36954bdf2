"""TensorBoard's side of :class:`corebus.integrations.tensorboard.TensorBoardLogger`: its records
(scalars, text, histograms, graphs) turned into event files, laid out as ``tf.summary`` writes them."""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import logging
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from corebus.kit import mirror_directory

log = logging.getLogger("corebus")

HISTOGRAM_BUCKETS = 30  # tf.summary.histogram's default
MIRROR = {"type": "mirror"}  # a record asking the writer to upload the event files to a remote log_dir


def staging_for(url: str, root: str | os.PathLike | None = None) -> str:
    """The local directory a remote ``log_dir``'s event files are written to before upload: one
    per URL, so a process resumed on the same machine finds its predecessor's files and spool."""
    name = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(root or os.path.join(tempfile.gettempdir(), "corebus-tensorboard")), name)


def event_writer(files: EventFiles, url: str | None) -> Callable[[list[dict[str, Any]]], None]:
    """The sink's ``send``: write the records into ``files``; with a remote ``url``, a
    :data:`MIRROR` record uploads the new or changed event files after them. An upload that
    fails is only logged: the records are written (a retried batch would write them twice) and
    the next mirror uploads whatever this one did not."""

    def send(records: list[dict[str, Any]]) -> None:
        events = [record for record in records if record["type"] != "mirror"]
        if events:
            files.write(events)
        if url is not None and len(events) < len(records):
            mirror(files.log_dir, url)

    return send


def mirror(local_dir: str, url: str) -> bool:
    """Upload the event files under ``local_dir`` that are new or changed to ``url``; ``False``
    (and a warning naming where the files are) when the store refused."""
    try:
        mirror_directory(local_dir, url)
        return True
    except Exception as exc:
        log.warning("TensorBoardLogger: could not upload %s to %s (%s); the next upload retries", local_dir, url, exc)
        return False


def download_missing(url: str, local_dir: str) -> None:
    """Fetch the event files under ``url`` that ``local_dir`` lacks: a run resumed on another
    machine then skips the values its predecessor wrote (``EventFiles(skip_written=True)``)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    for remote in fs.find(root):
        target = Path(local_dir) / remote[len(root) :].lstrip("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))


class EventFiles:
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
        self._written = written_values(self.log_dir) if skip_written else None

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
                values = summary_values(record)
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


def written_values(log_dir: str) -> set[tuple[str, str, int]]:
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


def summary_values(record: dict[str, Any]) -> list[Any]:
    """The ``Summary.Value`` protos ``tf.summary`` would write for one record."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.histogram import metadata as histogram_metadata
    from tensorboard.plugins.text.summary_v2 import text_pb
    from tensorboard.util import tensor_util

    kind, values = record["type"], record.get("values", {})
    if kind == "scalars":
        return [scalar_value(tag, number) for tag, number in values.items()]
    if kind == "text":
        return [value for tag, text in values.items() for value in text_pb(tag, text).value]
    if kind == "histograms":
        metadata = histogram_metadata.create_summary_metadata(display_name=None, description=None)
        return [
            summary_pb2.Summary.Value(
                tag=tag, metadata=metadata, tensor=tensor_util.make_tensor_proto(np.asarray(rows, np.float64))
            )
            for tag, rows in values.items()
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


def scalar_value(tag: str, number: float) -> Any:
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


def scalars(run: str, step: int, values: dict[str, float]) -> dict[str, Any]:
    return {"type": "scalars", "run": run, "step": int(step), "values": values}


def text_record(tag: str, step: int, text: str) -> dict[str, Any]:
    return {"type": "text", "run": "train", "step": int(step), "values": {tag: text}}


def buckets(data: np.ndarray, count: int = HISTOGRAM_BUCKETS) -> np.ndarray:
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


def graph_records(model: Any) -> list[dict[str, Any]]:
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
