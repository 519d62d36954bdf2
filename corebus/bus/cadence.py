"""When something is due: "every N steps", "once at step k", "between a and b".

One helper for every plugin that acts periodically, so none re-implements it. Decisions are
made by **boundary crossing** on the global optimizer step, never by ``step % n == 0``: with
``steps_per_execution=8`` the step jumps 0 -> 8 -> 16, and after a resume it starts wherever
the snapshot was, so an exact-equality test would skip or repeat events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cadence:
    """A set of global steps at which something is due.

    ``due(previous_step, step)`` is true when at least one due step lies in
    ``(previous_step, step]``, i.e. was crossed by the updates just done.
    """

    every: int | None = None
    at: int | None = None
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError(f"Cadence every={self.every!r}: must be a positive number of steps")
        if self.every is None and self.at is None:
            raise ValueError("Cadence needs every=N or at=k")

    @classmethod
    def every_n(cls, n: int, *, start: int = 0, stop: int | None = None) -> "Cadence":
        """Due at steps ``start + n, start + 2n, ...`` (up to ``stop`` inclusive)."""
        return cls(every=int(n), start=int(start), stop=stop)

    @classmethod
    def once(cls, step: int) -> "Cadence":
        """Due exactly once, when step ``step`` is crossed."""
        return cls(at=int(step))

    @classmethod
    def between(cls, start: int, stop: int, every: int = 1) -> "Cadence":
        """Due every ``every`` steps in ``(start, stop]``."""
        return cls(every=int(every), start=int(start), stop=int(stop))

    def due(self, previous_step: int, step: int) -> bool:
        """Whether a due step lies in ``(previous_step, step]``."""
        if step <= previous_step:
            return False
        if self.every == 1 and self.stop is None:  # every step (a logger's default): asked per step
            return step > self.start
        if self.at is not None:
            return previous_step < self.at <= step
        low = max(previous_step, self.start)
        high = step if self.stop is None else min(step, self.stop)
        if high <= low:
            return False
        # multiples of `every` counted from `start` that are <= high, minus those <= low
        return (high - self.start) // self.every > (low - self.start) // self.every

    def picks(self, records: Iterable[Any]) -> list[Any]:
        """The records (``on_log_steps``'s :class:`corebus.LoggedStep`) at which this is due."""
        due = self.due
        return [record for record in records if due(record.previous_step, record.step)]

    def due_now(self, trainer: Any) -> bool:
        """``due`` for the updates of the train call that just ended."""
        return self.due(trainer.previous_global_step, trainer.global_step)
