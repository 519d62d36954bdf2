"""Checks of plugin parameters that a type hint cannot say: a number's range, a name from a set.

One helper for every plugin and logger, so the same kind of parameter gets the same rule and the
same message (``"StallAlert: timeout=-1 must be > 0 seconds (or None)"``) whether the plugin was
built in Python or from a config file, where :mod:`corebus.bus.typecheck` has already checked
the types.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from corebus.errors import ConfigError


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    integer: bool = False,
    unit: str = "",
    allow_none: bool = False,
) -> None:
    """Raise :class:`~corebus.ConfigError` unless ``value`` is a number (an ``int`` with
    ``integer=True``; never a bool; numpy's scalars count) with ``value > above``, ``value >= at_least`` and
    ``value < below`` for the bounds given; ``None`` passes with ``allow_none=True``.

    ``unit`` ends the message (``"seconds"``, ``"steps"``)."""
    if value is None and allow_none:
        return
    kinds = numbers.Integral if integer else numbers.Real  # numpy's numbers count too
    ok = isinstance(value, kinds) and not isinstance(value, bool) and value == value  # NaN fails
    if ok:
        ok = (
            (above is None or value > above)
            and (at_least is None or value >= at_least)
            and (below is None or value < below)
        )
    if ok:
        return
    rules = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else ""]
    rules.append(f"< {below:g}" if below is not None else "")
    rule = " and ".join(r for r in rules if r) or "a number"
    text = f"{owner}: {name}={value!r} must be {'an integer ' if integer else ''}{rule}"
    text += f" {unit}" if unit else ""
    text += " (or None)" if allow_none else ""
    raise ConfigError(text)


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise :class:`~corebus.ConfigError` unless ``value`` is one of ``choices``, listing them."""
    choices = list(choices)
    if value in choices:
        return
    raise ConfigError(f"{owner}: {name}={value!r} is unknown; use one of {', '.join(map(str, choices))}")
