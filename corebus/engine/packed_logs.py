"""The packed-log layout: where each name sits in a compiled call's one float32 vector.

A train call returns every value it reports packed in one vector (one host fetch, on first
read). :class:`PackedLogs` knows, per trace, which positions are the batch logs Keras hands
callbacks (running means) and which are ``on_log``'s step values, derives a call's own value
of a running mean from two consecutive calls, and turns the calls held for ``on_log_steps``
into lazy records at hand-over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras

from corebus.bus.logs import LazyLogs, LoggedStep, _Packed
from corebus.engine.data import ArrayData

#: Prefix, inside the packed vector, of the values only ``on_log`` sees (the step's own values).
STEP_VALUE = "@"


def _mean_metric_names(model: keras.Model) -> set[str]:
    """Log names of the model's metrics that are running means (loss tracker,
    ``MeanMetricWrapper`` metrics): a batch's own value follows from two running means."""
    names: set[str] = set()
    for metric in model.metrics:
        groups = getattr(metric, "_flat_metrics", None)
        if groups is None:
            if isinstance(metric, keras.metrics.Mean):
                names.add(metric.name)
            continue
        for group in groups:  # CompileMetrics: name as Keras does (output prefix)
            for inner in getattr(group, "metrics", None) or []:
                if isinstance(inner, keras.metrics.Mean):
                    names.add(f"{group.output_name}_{inner.name}" if group.output_name else inner.name)
    return names


def _views(names: tuple[str, ...]) -> tuple[tuple, tuple, tuple, tuple]:
    """Names and positions of the batch logs and of ``on_log``'s step values in a packed vector."""
    position = {name: i for i, name in enumerate(names)}
    logs = [n for n in names if not n.startswith(STEP_VALUE)]
    extra = [n[len(STEP_VALUE) :] for n in names if n.startswith(STEP_VALUE) and n[len(STEP_VALUE) :] not in position]
    step_names = logs + sorted(extra)
    step_positions = [position.get(STEP_VALUE + n, position.get(n)) for n in step_names]
    return tuple(logs), tuple(position[n] for n in logs), tuple(step_names), tuple(step_positions)


class _CallLayout(NamedTuple):
    """Where one trace's names sit in its packed vector, and what on_log derives (once per trace)."""

    packed_names: list[str]
    log_names: tuple[str, ...]
    log_positions: tuple[int, ...]
    step_names: tuple[str, ...]
    step_positions: tuple[int, ...]
    derived: tuple[tuple[str, int], ...]  # (name, position of its running mean)


class HeldCall(NamedTuple):
    """A train call's output held for ``on_log_steps``: made into its step values at hand-over,
    so the training loop spends a tuple per call, not the values' Python work."""

    packed: Any
    before: tuple[Any, int, _CallLayout | None] | None  # the call before: (packed, end batch, layout)
    begin: int
    n: int
    rows: ArrayData | None
    layout: _CallLayout


def _step_logs(
    layout: _CallLayout,
    source: _Packed,
    before: tuple[_Packed, int, _CallLayout | None] | None,
    begin: int,
    n: int,
    rows: ArrayData | None,
) -> LazyLogs:
    """``on_log``'s step values of the call of batches ``begin..begin+n-1`` (a view of its packed
    vector: one fetch, on first read).

    The step's own loss comes packed from the step. Other running means (accuracy...) give
    the call's own value from two consecutive running means and the rows each covers:
    ``(mean_now * rows_now - mean_before * rows_before) / rows_in_call``, computed on the
    host when first read (no work in the step; float32 means, so the value is close, not
    bit-exact). Where rows are unknown (datasets, sample weights, a resumed epoch's first
    call), the running mean is what is logged.
    """
    derive = None
    if (
        layout.derived
        and rows is not None
        and before is not None
        and before[1] == begin
        and before[2] is layout
        and begin > 0
    ):
        derive = (layout.derived, before[0], rows.samples_before(begin), rows.samples_before(begin + n))
    return LazyLogs._of_call(layout.step_names, layout.step_positions, source, derive)


class PackedLogs:
    """The layout of the train calls' packed vectors, and the lazy logs made from them.

    :param names: the names of the current train trace's packed vector, in order (the compiled
        step fills this list in place at trace time).
    :param mean_names: the log names whose own value can be derived from two running means
        (empty for a custom step, whose logs need not be Keras's running means).
    """

    def __init__(self, names: list[str], mean_names: Callable[[], set[str]]) -> None:
        self.names = names
        self._mean_names = mean_names
        self._layout: _CallLayout | None = None
        self._previous_call: tuple[_Packed, int, _CallLayout] | None = None

    def new_epoch(self) -> None:
        """Metrics were reset (or restored mid-epoch): no call before to derive from."""
        self._previous_call = None

    def layout(self) -> _CallLayout:
        """Where the current trace's names sit in its packed vector (rebuilt after a new trace)."""
        layout = self._layout
        if layout is None or layout.packed_names != self.names:
            names = tuple(self.names)
            log_names, log_positions, step_names, step_positions = _views(names)
            means = self._mean_names()
            packed_own = {name[len(STEP_VALUE) :] for name in names if name.startswith(STEP_VALUE)}
            # running means whose own value the step does not pack: derived from two calls
            derived = tuple(
                (name, position)
                for name, position in zip(log_names, log_positions)
                if name in means and name not in packed_own
            )
            layout = self._layout = _CallLayout(
                list(names), log_names, log_positions, step_names, step_positions, derived
            )
        return layout

    def call_logs(
        self, packed: Any, rows: ArrayData | None, begin: int, n: int, want_logs: bool, want_values: bool
    ) -> tuple[LazyLogs | None, LazyLogs | None]:
        """The batch logs (Keras's running means) and on_log's step values (:func:`_step_logs`)
        of one call, each only when wanted (views of one packed vector: one fetch, on first read)."""
        layout = self.layout()
        source = _Packed(packed)
        previous, self._previous_call = self._previous_call, (source, begin + n, layout)
        logs = LazyLogs._of_call(layout.log_names, layout.log_positions, source) if want_logs else None
        if not want_values:
            return logs, None
        return logs, _step_logs(layout, source, previous, begin, n, rows)

    def last_logs(self, packed: Any) -> LazyLogs:
        """The batch logs of the epoch's last call (``packed``)."""
        # The last call's own source where its views were made: they share one fetch.
        source = self._previous_call[0] if self._previous_call is not None else _Packed(packed)
        layout = self.layout()
        return LazyLogs._of_call(layout.log_names, layout.log_positions, source)

    def logged_steps(self, held: list[tuple[int, int, float, Any]]) -> list[LoggedStep]:
        """The held entries as ``on_log_steps`` records: a held call is made into its step values."""
        sources: dict[int, _Packed] = {}  # one per packed tensor: a call and the next share its fetch

        def source_of(packed: Any) -> _Packed:
            return sources.get(id(packed)) or sources.setdefault(id(packed), _Packed(packed))

        records = []
        for step, previous_step, at, values in held:
            if type(values) is HeldCall:
                before = values.before
                if before is not None:
                    before = (source_of(before[0]), before[1], before[2])
                values = _step_logs(
                    values.layout, source_of(values.packed), before, values.begin, values.n, values.rows
                )
            records.append(LoggedStep(step, previous_step, at, values))
        return records
