"""Batch logs that stay on the device until someone reads them."""

from __future__ import annotations

from abc import ABCMeta
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np


class LoggedStep(NamedTuple):
    """One train call's batch record, as ``on_log_steps`` hands it over."""

    step: int
    """The global optimizer step after the call (the x axis)."""
    previous_step: int
    """The global step before the call: a :class:`corebus.Cadence` is due if it crossed a step."""
    time: float
    """Wall-clock time (``time.time()``) when the call ended."""
    logs: Mapping[str, Any]
    """What ``on_log`` would have had (lazy: read when used)."""


class _Packed:
    """One call's packed values, shared by every view of them: fetched at most once."""

    __slots__ = ("packed", "flat")

    def __init__(self, packed: Any):
        self.packed = packed
        self.flat: list[float] | None = None

    def fetch(self) -> list[float]:
        flat = self.flat
        if flat is None:
            _FETCHES[0] += 1
            packed = self.packed
            if isinstance(packed, dict):  # from_tensors
                packed = _stack_scalars(list(packed.values()))
            to_numpy = getattr(packed, "numpy", None)  # a tensor's own is the quickest way out
            array = to_numpy() if to_numpy is not None else np.asarray(packed)
            if array.dtype.kind != "f":
                array = array.astype(np.float64)
            flat = self.flat = array.reshape(-1).tolist()  # float32 from the step: exact as floats
            self.packed = None
        return flat


class _CountsFetches(ABCMeta):
    @property
    def fetches(cls) -> int:
        """Host fetches performed by all LazyLogs so far (tests and benchmarks read it).

        Counted outside the class: writing a class attribute per fetch would invalidate the
        interpreter's attribute caches for every LazyLogs (measured: reads 1.8x as slow)."""
        return _FETCHES[0]


class LazyLogs(Mapping, metaclass=_CountsFetches):
    """A read-only mapping of metric name to float, fetched from the device on first read.

    The compiled step packs every scalar it reports into one float32 vector, so the first
    ``logs["loss"]`` costs a single host transfer for all values and later reads are free.
    Names (``keys()``, ``in``, ``len``) are known without touching the device, so a plugin
    can check for a metric without forcing a sync. Several mappings can be views of the same
    packed vector (:meth:`view`): the batch logs of ``on_train_batch_end`` and the per-step
    values of ``on_log`` share one fetch.

    A view may also carry a *derivation*: values of some names computed on the first read
    from this call's and the previous call's packed vectors (a call's own accuracy from two
    running means, see ``Trainer``). Reading then fetches both; in step order the earlier one
    was already read.
    """

    __slots__ = ("_names", "_positions", "_source", "_values", "_derive")

    def __init__(self, names: Sequence[str], packed: Any, positions: Sequence[int] | None = None):
        self._names = tuple(names)
        self._positions = tuple(range(len(self._names))) if positions is None else tuple(positions)
        self._source = packed if isinstance(packed, _Packed) else _Packed(packed)
        self._values: dict[str, float] | None = None
        self._derive: tuple | None = None

    @classmethod
    def from_tensors(cls, values: Mapping[str, Any]) -> "LazyLogs":
        """Wrap a dict of scalar tensors (e.g. Keras batch logs); packing happens on first read."""
        return cls(list(values), dict(values))

    def view(self, names: Sequence[str], positions: Sequence[int]) -> "LazyLogs":
        """Another mapping over the same packed values (``positions`` index the packed vector)."""
        return LazyLogs(names, self._source, positions)

    @classmethod
    def _of_call(
        cls, names: tuple[str, ...], positions: tuple[int, ...], source: _Packed, derive: tuple | None = None
    ) -> "LazyLogs":
        """The engine's per-call constructor (tuples made once per trace, no copies).

        ``derive``: ``(((name, position), ...), earlier source, rows before, rows now)``:
        ``name`` becomes ``(now * rows_now - before * rows_before) / (rows_now - rows_before)``
        of the running mean at ``position`` in this call's and the earlier call's vectors.
        """
        logs = _new(cls)
        logs._names, logs._positions, logs._source, logs._values, logs._derive = names, positions, source, None, derive
        return logs

    def _fetch(self) -> dict[str, float]:
        values = self._values
        if values is None:
            flat = self._source.fetch()
            values = {name: flat[i] for name, i in zip(self._names, self._positions)}
            if self._derive is not None:
                derived, earlier_source, rows_before, rows_now = self._derive
                earlier, rows = earlier_source.fetch(), rows_now - rows_before
                for name, i in derived:
                    values[name] = (flat[i] * rows_now - earlier[i] * rows_before) / rows
                self._derive = None
            self._values = values
        return values

    @property
    def fetched(self) -> bool:
        """Whether the values were already brought to the host."""
        return self._source.flat is not None

    def __getitem__(self, key: str) -> float:
        if key not in self._names:
            raise KeyError(key)
        return self._fetch()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def to_dict(self) -> dict[str, float]:
        return dict(self._fetch())

    def __repr__(self) -> str:
        if not self.fetched:
            return f"LazyLogs(<not fetched: {', '.join(self._names)}>)"
        return f"LazyLogs({self._fetch()!r})"


_new = object.__new__
_FETCHES = [0]  # LazyLogs.fetches


def read_all(values: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict of every value: a :class:`LazyLogs` is read in one call (one host fetch, one
    dict), not with one lookup per name."""
    return values.to_dict() if hasattr(values, "to_dict") else dict(values)


def _stack_scalars(values: list[Any]) -> Any:
    if not values:
        return np.zeros((0,), np.float32)
    if all(isinstance(v, (int, float, np.number)) for v in values):
        return np.asarray(values, np.float64)
    import tensorflow as tf

    return tf.stack([tf.cast(tf.reshape(v, []), tf.float32) for v in values])
