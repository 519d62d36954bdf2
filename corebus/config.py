"""Config-driven runs: ``corebus run config.toml`` (or ``.yaml``).

A run config names everything a run needs, so a run is one file::

    [model]
    factory = "corebus.demo:digits_mlp"          # "module:function" returning a keras.Model
    params = { seed = 0 }

    [data]
    factory = "corebus.demo:load_digits_split"   # returns (x, y), ((x, y), (x_val, y_val)),
                                                  # a tf.data.Dataset, or a dict of fit arguments
    [trainer]
    optimizer = "adam"                           # or { name = "adam", learning_rate = 1e-3 }
    loss = "sparse_categorical_crossentropy"
    metrics = ["accuracy"]

    [fit]
    epochs = 10
    batch_size = 64

    [[plugins]]
    name = "alert_webhook"
    url = "${SLACK_WEBHOOK_URL}"                 # from the environment, never echoed

The whole file is checked before anything runs, against a typed schema: an unknown key, a value
of the wrong type, a factory that does not import, a plugin that is not installed or rejects its
params each fail with one message naming the file, the key and what is allowed. ``${VAR}`` in any
string is replaced from the environment; the values that came from there are registered as
secrets, so plan output, error messages and logged run params show ``${VAR}`` or ``***``.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingExtraError
from .sinks import register_secret

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Key:
    """One allowed key: its type(s) and an optional check with the allowed values in words."""

    types: tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    allowed: str = ""


def _positive(value: Any) -> bool:
    return value >= 1


def _fraction(value: Any) -> bool:
    return 0.0 <= value < 1.0


SCHEMA: dict[str, dict[str, Key]] = {
    "model": {"factory": Key((str,), None, '"module:function"'), "params": Key((dict,))},
    "data": {"factory": Key((str,), None, '"module:function"'), "params": Key((dict,))},
    "trainer": {
        "optimizer": Key((str, dict)), "loss": Key((str, dict)), "metrics": Key((list,)),
        "steps_per_execution": Key((int,), _positive, "an integer >= 1"), "jit_compile": Key((bool,)),
        "seed": Key((int,)), "profile": Key((bool,)),
        "mixed_precision": Key((str,), lambda v: v in ("mixed_float16", "mixed_bfloat16"),
                               '"mixed_float16" or "mixed_bfloat16"'),
    },
    "fit": {
        "epochs": Key((int,), lambda v: v >= 0, "an integer >= 0"), "batch_size": Key((int,), _positive, "an integer >= 1"),
        "verbose": Key((int,), lambda v: v in (0, 1, 2), "0, 1 or 2"),
        "validation_split": Key((float, int), _fraction, "a fraction in [0, 1)"), "shuffle": Key((bool,)),
        "initial_epoch": Key((int,), lambda v: v >= 0, "an integer >= 0"),
        "steps_per_epoch": Key((int,), _positive, "an integer >= 1"), "validation_steps": Key((int,), _positive, "an integer >= 1"),
        "validation_batch_size": Key((int,), _positive, "an integer >= 1"), "validation_freq": Key((int,), _positive, "an integer >= 1"),
    },
    "run": {"name": Key((str,)), "dir": Key((str,))},
}
REQUIRED = {"model": ("factory",), "data": ("factory",)}


@dataclass
class RunConfig:
    """A validated run config (secrets resolved); :meth:`build` makes the trainer."""

    path: Path
    sections: dict[str, dict[str, Any]]
    plugins: list[tuple[str, Any]]  # (entry-point name, instance), in config order
    templates: list[dict[str, Any]] = field(default_factory=list)  # plugins as written (``${VAR}`` kept)
    secrets: dict[str, str] = field(default_factory=dict)  # value from the environment -> "${VAR}"

    def factory(self, section: str) -> Callable[..., Any]:
        return _import(self.sections[section]["factory"], f"{self.path}: {section}.factory")

    def build(self) -> tuple[Any, dict[str, Any]]:
        """``(trainer, fit kwargs)``: the model and data factories run here."""
        from .trainer import Trainer

        model = self.factory("model")(**self.sections["model"].get("params", {}))
        trainer_args = dict(self.sections.get("trainer", {}))
        optimizer = trainer_args.pop("optimizer", None)
        if isinstance(optimizer, dict):
            import keras

            params = dict(optimizer)
            optimizer = keras.optimizers.get({"class_name": params.pop("name", "adam"), "config": params})
        trainer = Trainer(model, optimizer, trainer_args.pop("loss", None), trainer_args.pop("metrics", None),
                          plugins=self.plugins, **trainer_args)
        fit = {**_fit_data(self.factory("data")(**self.sections["data"].get("params", {})), self.path),
               **self.sections.get("fit", {})}
        return trainer, fit


def load_run_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Parse and validate a run config; ``overrides`` maps ``"fit.epochs"`` style keys to values."""
    from .registry import instantiate, load_config_file, specs_from

    path = Path(path)
    data = load_config_file(path)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"--set {dotted}: write section.key=value (e.g. fit.epochs=3)")
        data.setdefault(section, {})[key] = value
    unknown = sorted(set(data) - set(SCHEMA) - {"plugins"})
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}; allowed: {', '.join([*SCHEMA, 'plugins'])}")
    secrets: dict[str, str] = {}
    sections = {}
    for section, keys in SCHEMA.items():
        table = data.get(section, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{path}: [{section}] must be a table of keys")
        for required in REQUIRED.get(section, ()):
            if required not in table:
                raise ConfigError(f"{path}: {section}.{required} is required ({keys[required].allowed})")
        sections[section] = {k: _check(path, f"{section}.{k}", keys, k, _interpolate(v, f"{section}.{k}", path, secrets))
                             for k, v in table.items()}
    for section in ("model", "data"):
        _import(sections[section]["factory"], f"{path}: {section}.factory")  # fails now, not mid-run
    templates = specs_from(data.get("plugins", []), str(path))
    plugins = []
    for i, template in enumerate(templates):
        spec = _interpolate(dict(template), f"plugins[{i}]", path, secrets)
        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            plugins.append((spec["name"], instantiate(spec["name"], params)))
        except MissingExtraError:
            raise
        except ConfigError as exc:
            raise ConfigError(f"{path}: plugins[{i}] ({spec['name']}): {_hide(str(exc), secrets)}") from None
    return RunConfig(path, sections, plugins, templates, secrets)


def _check(path: Path, where: str, keys: Mapping[str, Key], key: str, value: Any) -> Any:
    spec = keys.get(key)
    if spec is None:
        raise ConfigError(f"{path}: {where}: unknown key; allowed: {', '.join(keys)}")
    type_ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if not type_ok or (spec.check is not None and not spec.check(value)):
        wanted = spec.allowed or " or ".join(t.__name__ for t in spec.types)
        raise ConfigError(f"{path}: {where} = {value!r}: expected {wanted}")
    return value


def _interpolate(value: Any, where: str, path: Path, secrets: dict[str, str]) -> Any:
    """``${VAR}`` -> the environment's value (registered as a secret), recursively."""
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{path}: {where} uses ${{{name}}}, which is not set in the environment")
            secrets[os.environ[name]] = match.group(0)
            register_secret(os.environ[name])
            return os.environ[name]

        return _ENV.sub(replace, value)
    if isinstance(value, Mapping):
        return {k: _interpolate(v, f"{where}.{k}", path, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", path, secrets) for i, v in enumerate(value)]
    return value


def _hide(text: str, secrets: Mapping[str, str]) -> str:
    for value, template in secrets.items():
        if value:
            text = text.replace(value, template)
    return text


def _import(target: str, where: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f'{where} = {target!r}: write "module:function" (e.g. "corebus.demo:digits_mlp")')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where} = {target!r}: cannot import {module_name!r} ({exc})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"{where} = {target!r}: {module_name} has no callable {attr!r}")
    return function


def _fit_data(value: Any, path: Path) -> dict[str, Any]:
    """What a data factory returned, as ``fit`` arguments."""
    if isinstance(value, Mapping):
        return dict(value)
    if type(value).__name__.endswith("Dataset") or not isinstance(value, (tuple, list)):
        return {"x": value}
    if len(value) == 2 and all(isinstance(part, (tuple, list)) for part in value):
        (x, y), validation = value
        return {"x": x, "y": y, "validation_data": tuple(validation)}
    if len(value) == 2 and type(value[1]).__name__.endswith("Dataset"):
        return {"x": value[0], "validation_data": value[1]}
    if len(value) in (2, 3):
        return dict(zip(("x", "y", "sample_weight"), value))
    raise ConfigError(f"{path}: data.factory returned a {len(value)}-tuple; return (x, y), "
                      "((x, y), (x_val, y_val)), a tf.data.Dataset or a dict of fit arguments")


def describe_config(config: RunConfig) -> str:
    """The config as the user wrote it (``${VAR}`` kept), for ``--print-plan``."""
    lines = [f"run config {config.path}"]
    for section, values in config.sections.items():
        if values:
            lines.append(f"  [{section}] " + ", ".join(f"{k}={_hide(repr(v), config.secrets)}" for k, v in values.items()))
    for template in config.templates:
        params = ", ".join(f"{k}={v!r}" for k, v in template.items() if k != "name")
        lines.append(f"  plugin {template['name']}({params})")
    return "\n".join(lines)
