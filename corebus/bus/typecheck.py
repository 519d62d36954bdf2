"""Values from config files checked against type hints (plugin, factory and schema signatures).

pydantic does the checking, in strict mode: ``"false"`` is not a bool and ``"3"`` not an int, as a
config reader expects, while any hint a signature may carry (unions, ``Literal``, ``list[str]``,
``os.PathLike``, ``Annotated`` constraints) is understood without a checker of our own. The
messages stay ours: the caller names the file and the key, this module says what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any) -> Any:
    import pydantic

    config = pydantic.ConfigDict(strict=True, arbitrary_types_allowed=True)
    return pydantic.TypeAdapter(hint, config=config)


def matches(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits ``hint``; a hint pydantic cannot read counts as fitting."""
    import pydantic

    try:
        adapter = _adapter(hint)
    except (TypeError, pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError):
        return True  # an exotic or unhashable hint: the constructor's own checks still run
    for candidate in (value, _tuples(value)):  # TOML and YAML have lists where a hint says tuple
        try:
            adapter.validate_python(candidate)
            return True
        except pydantic.ValidationError:
            pass
    return False


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def hint_text(hint: Any) -> str:
    """A hint as a reader writes it: ``bool``, ``float | None``, ``str | os.PathLike``."""
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    text = str(hint)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    for prefix in ("typing.", "collections.abc.", "builtins."):
        text = text.replace(prefix, "")
    return text.replace("NoneType", "None")


def type_hints(function: Callable[..., Any]) -> dict[str, Any]:
    """The resolved hints of a callable (of a class: its ``__init__``); ``{}`` where they do not resolve."""
    target = function.__init__ if inspect.isclass(function) else function
    try:
        return typing.get_type_hints(target)
    except Exception:  # names only importable under TYPE_CHECKING, and the like
        return {}


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``did you mean X?`` for the closest of ``choices``, else ``""``."""
    found = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(found)}?" if found else ""


def closest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, else ``""``."""
    text = did_you_mean(name, choices)
    return f" ({text})" if text else ""


def check_call(function: Callable[..., Any], params: Mapping[str, Any], what: str) -> str | None:
    """What is wrong with calling ``function(**params)`` (``what`` names it), in words, or ``None``.

    Unknown, missing and ill-typed arguments are found from the signature and its hints,
    before anything is called.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    accepted = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    hints = type_hints(function)
    allowed = ", ".join(p.name + (f" ({hint_text(hints[p.name])})" if p.name in hints else "") for p in accepted)
    names = {p.name for p in accepted}
    for key in params:
        if key not in names and not takes_any:
            return f"{key}: {what} has no such parameter{closest(key, names)}; allowed: {allowed or '(none)'}"
    missing = [p.name for p in accepted if p.default is p.empty and p.name not in params]
    if missing:
        return f"{missing[0]}: {what} requires it; allowed: {allowed}"
    for key, value in params.items():
        hint = hints.get(key)
        if hint is not None and not matches(hint, value):
            return f"{key} = {value!r}: expected {hint_text(hint)}"
    return None
