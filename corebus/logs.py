"""Batch logs that stay on the device until someone reads them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np


class LazyLogs(Mapping):
    """A read-only mapping of metric name to float, fetched from the device on first read.

    The compiled step packs every scalar it reports into one float32 vector, so the first
    ``logs["loss"]`` costs a single host transfer for all values and later reads are free.
    Names (``keys()``, ``in``, ``len``) are known without touching the device, so a plugin
    can check for a metric without forcing a sync.
    """

    __slots__ = ("_names", "_packed", "_values")

    #: Total number of host fetches performed by all LazyLogs (tests and benchmarks read it).
    fetches = 0

    def __init__(self, names: Sequence[str], packed: Any):
        self._names = tuple(names)
        self._packed = packed
        self._values: dict[str, float] | None = None

    @classmethod
    def from_tensors(cls, values: Mapping[str, Any]) -> "LazyLogs":
        """Wrap a dict of scalar tensors (e.g. Keras batch logs); packing happens on first read."""
        return cls(list(values), values)

    def _fetch(self) -> dict[str, float]:
        if self._values is None:
            LazyLogs.fetches += 1
            packed = self._packed
            if isinstance(packed, Mapping):
                packed = _stack_scalars(list(packed.values()))
            flat = np.asarray(packed, dtype=np.float64).reshape(-1).tolist()
            self._values = dict(zip(self._names, flat))
            self._packed = None
        return self._values

    @property
    def fetched(self) -> bool:
        """Whether the values were already brought to the host."""
        return self._values is not None

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
        if self._values is None:
            return f"LazyLogs(<not fetched: {', '.join(self._names)}>)"
        return f"LazyLogs({self._values!r})"


def _stack_scalars(values: list[Any]) -> Any:
    if not values:
        return np.zeros((0,), np.float32)
    if all(isinstance(v, (int, float, np.number)) for v in values):
        return np.asarray(values, np.float64)
    import tensorflow as tf

    return tf.stack([tf.cast(tf.reshape(v, []), tf.float32) for v in values])
