"""Batch logs that stay on the device until someone reads them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np


class _Packed:
    """One step's packed values, shared by every view of them: fetched at most once."""

    __slots__ = ("packed", "flat")

    def __init__(self, packed: Any):
        self.packed = packed
        self.flat: list[float] | None = None

    def fetch(self) -> list[float]:
        if self.flat is None:
            LazyLogs.fetches += 1
            packed = self.packed
            if isinstance(packed, Mapping):
                packed = _stack_scalars(list(packed.values()))
            flat = np.asarray(packed)  # float32 from the step: its tolist() gives the same floats
            if flat.dtype not in (np.float32, np.float64):
                flat = flat.astype(np.float64)
            self.flat = flat.reshape(-1).tolist()
            self.packed = None
        return self.flat


class LazyLogs(Mapping):
    """A read-only mapping of metric name to float, fetched from the device on first read.

    The compiled step packs every scalar it reports into one float32 vector, so the first
    ``logs["loss"]`` costs a single host transfer for all values and later reads are free.
    Names (``keys()``, ``in``, ``len``) are known without touching the device, so a plugin
    can check for a metric without forcing a sync. Several mappings can be views of the same
    packed vector (:meth:`view`): the batch logs of ``on_train_batch_end`` and the per-step
    values of ``on_log`` share one fetch.
    """

    __slots__ = ("_names", "_positions", "_source", "_values")

    #: Total number of host fetches performed by all LazyLogs (tests and benchmarks read it).
    fetches = 0

    def __init__(self, names: Sequence[str], packed: Any, positions: Sequence[int] | None = None):
        self._names = tuple(names)
        self._positions = tuple(range(len(self._names))) if positions is None else tuple(positions)
        self._source = packed if isinstance(packed, _Packed) else _Packed(packed)
        self._values: dict[str, float] | None = None

    @classmethod
    def from_tensors(cls, values: Mapping[str, Any]) -> "LazyLogs":
        """Wrap a dict of scalar tensors (e.g. Keras batch logs); packing happens on first read."""
        return cls(list(values), dict(values))

    def view(self, names: Sequence[str], positions: Sequence[int]) -> "LazyLogs":
        """Another mapping over the same packed values (``positions`` index the packed vector)."""
        return LazyLogs(names, self._source, positions)

    def _fetch(self) -> dict[str, float]:
        if self._values is None:
            flat = self._source.fetch()
            self._values = {name: flat[i] for name, i in zip(self._names, self._positions)}
        return self._values

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


class DerivedLogs(Mapping):
    """``base`` (lazy logs) with the values of some names replaced by ``compute()``'s, which
    runs on the first read of one of those names: reading the others costs what ``base`` does."""

    __slots__ = ("_base", "_derived", "_compute", "_values")

    def __init__(self, base: Mapping[str, float], derived: Sequence[str], compute: Any):
        self._base = base
        self._derived = frozenset(derived)
        self._compute = compute
        self._values: dict[str, float] | None = None

    def __getitem__(self, key: str) -> float:
        if key not in self._derived:
            return self._base[key]
        return self._computed()[key]

    def _computed(self) -> dict[str, float]:
        if self._values is None:
            self._values, self._compute = self._compute(), None
        return self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def __contains__(self, key: object) -> bool:
        return key in self._base

    def to_dict(self) -> dict[str, float]:
        values = read_all(self._base)
        values.update(self._computed())
        return values

    def __repr__(self) -> str:
        return f"DerivedLogs({self.to_dict()!r})" if self._values is not None else f"DerivedLogs(<not read: {', '.join(self)}>)"


def read_all(values: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict of every value: a :class:`LazyLogs` or :class:`DerivedLogs` is read in one
    call (one host fetch, one dict), not with one lookup per name."""
    return values.to_dict() if hasattr(values, "to_dict") else dict(values)


def _stack_scalars(values: list[Any]) -> Any:
    if not values:
        return np.zeros((0,), np.float32)
    if all(isinstance(v, (int, float, np.number)) for v in values):
        return np.asarray(values, np.float64)
    import tensorflow as tf

    return tf.stack([tf.cast(tf.reshape(v, []), tf.float32) for v in values])
