"""Installed plugins (the ``corebus.plugins`` entry-point group) and turning specs into plugins.

Installed is not active: a run activates a plugin by instance, by entry-point name, or by a
``{"name": ..., **params}`` mapping, possibly read from a TOML/YAML file. Built-in plugins are
registered in pyproject exactly as a third party registers one.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as metadata
import importlib.util
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from corebus.bus.typecheck import closest, hint_text, matches, type_hints
from corebus.errors import ConfigError, MissingExtraError

ENTRY_POINT_GROUP = "corebus.plugins"

PluginSpec = Union[object, str, Mapping[str, Any]]


@dataclass
class PluginInfo:
    """One installed plugin, described without importing it."""

    name: str
    target: str
    distribution: str
    version: str
    extras: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "distribution": self.distribution,
            "version": self.version,
            "extras": self.extras,
            "hooks": self.hooks,
        }


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def installed_plugins() -> list[PluginInfo]:
    """Every installed plugin with its distribution, version and the hooks it implements.

    Hooks are read from the plugin's source with ``ast``, so listing never imports heavy SDKs.
    """
    infos = []
    for name, ep in sorted(_entry_points().items()):
        dist = ep.dist
        infos.append(
            PluginInfo(
                name=name,
                target=ep.value.split("[")[0].strip(),
                distribution=dist.metadata["Name"] if dist else "?",
                version=dist.version if dist else "?",
                extras=list(ep.extras),
                hooks=_hooks_from_source(ep.module, ep.attr),
            )
        )
    return infos


def _hooks_from_source(module: str, attr: str | None) -> list[str]:
    from corebus.bus import hookspecs

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == attr:
            return sorted(
                item.name
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                and item.name in hookspecs.__all__
                and any(_is_hookimpl(d) for d in item.decorator_list)
            )
    return []


def _is_hookimpl(decorator: ast.expr) -> bool:
    if isinstance(decorator, ast.Call):
        decorator = decorator.func
    if isinstance(decorator, ast.Name):
        return decorator.id == "hookimpl"
    return isinstance(decorator, ast.Attribute) and decorator.attr == "hookimpl"


def load_plugin_class(name: str) -> type:
    """Import the class registered under ``name``; one clear error for unknown names."""
    eps = _entry_points()
    if name not in eps:
        raise ConfigError(
            f"unknown plugin {name!r}. Installed plugins: {', '.join(sorted(eps)) or '(none)'}. "
            f"Check the spelling, or install the package that provides it."
        )
    ep = eps[name]
    try:
        return ep.load()
    except MissingExtraError:
        raise
    except ImportError as exc:
        if ep.extras:
            raise MissingExtraError(f"plugin {name!r}", exc.name or str(exc), ep.extras[0]) from exc
        raise ConfigError(f"plugin {name!r} could not be imported: {exc}") from exc


def instantiate(name: str, params: Mapping[str, Any]) -> object:
    """Create the plugin registered as ``name`` with ``params``; bad params name the fix."""
    cls = load_plugin_class(name)
    try:
        signature = inspect.signature(cls)
        signature.bind(**params)
    except TypeError as exc:
        hint = _did_you_mean(cls, params)
        raise ConfigError(
            f"plugin {name!r} ({cls.__qualname__}) got bad params {dict(params)!r}: {exc}{hint}. "
            f"Accepted: {cls.__qualname__}{_signature_text(cls)}"
        ) from None
    hints = type_hints(cls)
    for key, value in params.items():
        if key in hints and not matches(hints[key], value):
            raise ConfigError(
                f"plugin {name!r} ({cls.__qualname__}): {key} = {value!r}: expected "
                f"{hint_text(hints[key])}. Accepted: {cls.__qualname__}{_signature_text(cls)}"
            )
    try:
        return cls(**params)
    except MissingExtraError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"plugin {name!r} rejected its params: {exc}") from exc


def _did_you_mean(cls: type, params: Mapping[str, Any]) -> str:
    try:
        known = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return ""
    unknown = [k for k in params if k not in known]
    return closest(unknown[0], known) if unknown else ""


def _signature_text(cls: type) -> str:
    try:
        return str(inspect.signature(cls))
    except (TypeError, ValueError):
        return "(...)"


def resolve(spec: PluginSpec) -> object:
    """Turn one plugin spec (instance, name or mapping) into a plugin instance."""
    if isinstance(spec, str):
        return instantiate(spec, {})
    if isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(
                f'plugin mapping {dict(spec)!r} has no \'name\': write {{"name": "<entry-point name>", **params}}'
            )
        return instantiate(name, params)
    if inspect.isclass(spec):
        raise ConfigError(
            f"got the class {spec.__qualname__} instead of an instance: "
            f"pass {spec.__qualname__}() (did you forget the parentheses?)"
        )
    return spec


def resolve_all(specs: Any) -> list[tuple[str, object]]:
    """Resolve a list of specs, or a path to a TOML/YAML file holding them, to named plugins.

    A plugin activated by entry-point name is called by that name in the hook plan and in
    checkpoints; an instance by its class name.
    """
    if specs is None:
        return []
    if isinstance(specs, (os.PathLike,)) or (isinstance(specs, str) and specs.endswith((".toml", ".yaml", ".yml"))):
        specs = load_plugin_config(specs)
    if isinstance(specs, (str, Mapping)) or not hasattr(specs, "__iter__"):
        specs = [specs]
    named = []
    for spec in specs:
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
            named.append(spec)  # (name, instance): already resolved, e.g. by a run config
            continue
        plugin = resolve(spec)
        if isinstance(spec, str):
            name = spec
        elif isinstance(spec, Mapping):
            name = spec["name"]
        else:
            name = plugin_name(plugin)
        named.append((name, plugin))
    return named


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML file into a mapping; one clear error if it does not."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc}") from exc
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # the parsers raise their own error types
        raise ConfigError(f"{path}: does not parse: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a table of sections at the top level")
    return dict(data)


def load_plugin_config(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read plugin specs from a TOML or YAML file.

    Either a list (``[[plugins]]`` tables with a ``name`` key) or a table keyed by name
    (``[plugins.early_stopping]`` with its params).
    """
    data = load_config_file(path)
    if data.get("plugins") is None:
        raise ConfigError(f"{path}: no 'plugins' key (expected a list or a table of plugins)")
    return specs_from(data["plugins"], str(path))


def specs_from(plugins: Any, where: str) -> list[dict[str, Any]]:
    """Plugin specs from a config's ``plugins`` value (a list, or a table keyed by name)."""
    if isinstance(plugins, Mapping):
        specs = []
        for name, params in plugins.items():
            if params is None:
                params = {}
            if not isinstance(params, Mapping):
                raise ConfigError(f"{where}: plugins.{name} must be a table of params")
            specs.append({"name": name, **params})
        return specs
    if isinstance(plugins, list):
        specs = []
        for i, item in enumerate(plugins):
            if isinstance(item, str):
                item = {"name": item}
            elif not isinstance(item, Mapping) or "name" not in item:
                raise ConfigError(f"{where}: plugins[{i}] needs a 'name' key")
            specs.append(dict(item))
        return specs
    raise ConfigError(f"{where}: 'plugins' must be a list or a table")


def plugin_name(plugin: object) -> str:
    """The display name of a plugin instance: its ``name`` attribute or its class name."""
    name = getattr(plugin, "plugin_name", None)
    if isinstance(name, str) and name:
        return name
    return type(plugin).__name__
