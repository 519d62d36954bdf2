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

    [run]
    name = "digits"                              # the run directory is <dir>/<name>; default: the file's name
    dir = "corebus-runs"                         # relative plugin paths (report_dir, filepath...) land there

    [[plugins]]
    name = "alert_webhook"
    url = "${SLACK_WEBHOOK_URL}"                 # from the environment, never echoed

The whole file is checked before anything runs: every value against its type (the schema below,
the factories' and plugins' signatures), the loss, metrics and optimizer against Keras, so an
unknown key, a value of the wrong type, a factory that does not import, a plugin that is not
installed or rejects its params each fail with one message naming the file, the key and what is
allowed. ``${VAR}`` in any
string is replaced from the environment; the values that came from there are registered as
secrets, so plan output, error messages and logged run params show ``${VAR}`` or ``***``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Interval

from corebus.bus.typecheck import check_call, closest, did_you_mean, hint_text, matches, type_hints
from corebus.delivery.sinks import redact_text, register_secret
from corebus.errors import ConfigError, MissingExtraError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Key:
    """One allowed key: its type hint (checked by pydantic, strictly) and the allowed values in words."""

    hint: Any
    allowed: str = ""
    check: Callable[[Any], bool] | None = None


_COUNT = Key(Annotated[int, Ge(1)], "an integer >= 1")
_FACTORY = Key(str, '"module:function"')
_PARAMS = Key(dict[str, Any], "a table of the factory's parameters")
_IDENTIFIER = str | dict[str, Any]

SCHEMA: dict[str, dict[str, Key]] = {
    "model": {"factory": _FACTORY, "params": _PARAMS},
    "data": {"factory": _FACTORY, "params": _PARAMS},
    "trainer": {
        "optimizer": Key(_IDENTIFIER, 'a Keras optimizer name or { name = "adam", learning_rate = 1e-3 }'),
        "loss": Key(_IDENTIFIER, "a Keras loss name (or its config table)"),
        "metrics": Key(list[_IDENTIFIER], "a list of Keras metric names"),
        "steps_per_execution": _COUNT,
        "jit_compile": Key(bool),
        "seed": Key(int),
        "profile": Key(bool),
        "mixed_precision": Key(Literal["mixed_float16", "mixed_bfloat16"], '"mixed_float16" or "mixed_bfloat16"'),
    },
    "fit": {
        "epochs": Key(Annotated[int, Ge(0)], "an integer >= 0"),
        "batch_size": _COUNT,
        "verbose": Key(Literal[0, 1, 2], "0, 1 or 2"),
        "validation_split": Key(Annotated[float, Interval(ge=0, lt=1)], "a fraction in [0, 1)"),
        "shuffle": Key(bool),
        "initial_epoch": Key(Annotated[int, Ge(0)], "an integer >= 0"),
        "steps_per_epoch": _COUNT,
        "validation_steps": _COUNT,
        "validation_batch_size": _COUNT,
        "validation_freq": _COUNT,
    },
    # The run's directory is <dir>/<name>: relative plugin paths land there, so runs of other names keep theirs.
    "run": {
        "name": Key(str, "a folder name (no / or \\)", lambda v: bool(v) and not re.search(r"[/\\]", v)),
        "dir": Key(str, "a folder"),
    },
}
REQUIRED = {"model": ("factory",), "data": ("factory",)}
DEFAULT_RUNS_DIR = "corebus-runs"
# Plugin parameters that name a file or folder (besides those hinted os.PathLike).
PATH_PARAMS = frozenset({"filepath", "filename", "path", "dir", "log_dir", "backup_dir", "report_dir"})


@dataclass
class RunConfig:
    """A validated run config (secrets resolved); :meth:`build` makes the trainer."""

    path: Path
    sections: dict[str, dict[str, Any]]
    plugins: list[tuple[str, Any]]  # (entry-point name, instance), in config order
    templates: list[dict[str, Any]] = field(default_factory=list)  # plugins as written (``${VAR}`` kept)
    secrets: dict[str, str] = field(default_factory=dict)  # value from the environment -> "${VAR}"
    run_dir: Path = Path(DEFAULT_RUNS_DIR)

    def factory(self, section: str) -> Callable[..., Any]:
        return _import(self.sections[section]["factory"], f"{self.path}: {section}.factory", self.path)

    def build(self) -> tuple[Any, dict[str, Any]]:
        """``(trainer, fit kwargs)``: the model and data factories run here."""
        from corebus.engine.trainer import Trainer

        model = self.factory("model")(**self.sections["model"].get("params", {}))
        trainer_args = dict(self.sections.get("trainer", {}))
        optimizer = trainer_args.pop("optimizer", None)
        if isinstance(optimizer, dict):
            optimizer = _optimizer(optimizer)
        trainer = Trainer(
            model,
            optimizer,
            trainer_args.pop("loss", None),
            trainer_args.pop("metrics", None),
            plugins=self.plugins,
            **trainer_args,
        )
        fit = {
            **_fit_data(self.factory("data")(**self.sections["data"].get("params", {})), self.path),
            **self.sections.get("fit", {}),
        }
        return trainer, fit


def load_run_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Parse and validate a run config; ``overrides`` maps ``"fit.epochs"`` style keys to values."""
    from corebus.bus.registry import load_config_file, specs_from

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
        sections[section] = {
            k: _check(path, f"{section}.{k}", keys, k, _interpolate(v, f"{section}.{k}", path, secrets))
            for k, v in table.items()
        }
    for section in ("model", "data"):  # fail now, not mid-run
        factory = _import(sections[section]["factory"], f"{path}: {section}.factory", path)
        problem = check_call(factory, sections[section].get("params", {}), sections[section]["factory"])
        if problem:
            raise ConfigError(f"{path}: {section}.params.{_hide(problem, secrets)}")
    _check_keras_identifiers(path, sections["trainer"])
    run = sections["run"]
    run_dir = Path(run.get("dir", DEFAULT_RUNS_DIR)) / run.get("name", path.stem)
    templates = specs_from(data.get("plugins", []), str(path))
    plugins = [
        _plugin(path, i, _interpolate(dict(t), f"plugins[{i}]", path, secrets), run_dir, secrets)
        for i, t in enumerate(templates)
    ]
    return RunConfig(path, sections, plugins, templates, secrets, run_dir)


def _plugin(path: Path, i: int, spec: dict[str, Any], run_dir: Path, secrets: Mapping[str, str]) -> tuple[str, Any]:
    from corebus.bus.registry import instantiate, load_plugin_class

    where = f"{path}: plugins[{i}] ({spec['name']})"
    try:
        params = _under_run_dir(
            load_plugin_class(spec["name"]), {k: v for k, v in spec.items() if k != "name"}, run_dir
        )
        return spec["name"], instantiate(spec["name"], params)
    except MissingExtraError:
        raise
    except ConfigError as exc:
        raise ConfigError(f"{where}: {_hide(str(exc), secrets)}") from None


def _under_run_dir(cls: type, params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Relative file and folder parameters resolved under the run directory; one left at a
    relative default (``report_dir="corebus-runs/report"``) becomes ``<run dir>/report``."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return params
    hints = type_hints(cls)
    for name, parameter in signature.parameters.items():
        if name not in PATH_PARAMS and "PathLike" not in hint_text(hints.get(name, "")):
            continue
        value = params.get(name, parameter.default)
        if isinstance(value, (str, os.PathLike)) and not Path(value).is_absolute():
            params[name] = str(run_dir / (value if name in params else Path(value).name))
    return params


def _check_keras_identifiers(path: Path, trainer: Mapping[str, Any]) -> None:
    """Loss, metrics and optimizer resolved now, as Keras resolves them (compile resolves lazily)."""
    import keras

    def resolve(kind: str, where: str, value: Any, getter: Callable[[Any], Any], names: list[str]) -> None:
        try:
            getter(value)
        except (ValueError, TypeError) as exc:
            if isinstance(value, str):
                raise ConfigError(
                    f"{path}: {where} = {value!r}: Keras has no {kind} of that name{closest(value, names)}"
                ) from None
            raise ConfigError(f"{path}: {where} = {value!r}: {exc}") from None

    def public(module: Any, *extra: str) -> list[str]:
        return [
            *extra,
            *(n for n in dir(module) if not n.startswith("_") and n not in ("get", "serialize", "deserialize")),
        ]

    if "loss" in trainer:
        resolve("loss", "trainer.loss", trainer["loss"], keras.losses.get, public(keras.losses))
    # compile() also takes these four names and picks the metric from the loss
    for i, metric in enumerate(trainer.get("metrics", [])):
        if metric not in ("accuracy", "acc", "crossentropy", "ce"):
            resolve(
                "metric",
                f"trainer.metrics[{i}]",
                metric,
                keras.metrics.get,
                public(keras.metrics, "accuracy", "acc", "crossentropy", "ce"),
            )
    optimizer = trainer.get("optimizer")
    if isinstance(optimizer, str):
        resolve("optimizer", "trainer.optimizer", optimizer, keras.optimizers.get, public(keras.optimizers))
    elif isinstance(optimizer, Mapping):
        name = optimizer.get("name", "adam")
        resolve("optimizer", "trainer.optimizer.name", name, keras.optimizers.get, public(keras.optimizers))
        cls = type(keras.optimizers.get(name))
        # Keras optimizers pass **kwargs up to their base class: the names along the MRO are the allowed ones
        allowed = list(
            dict.fromkeys(
                p.name
                for c in cls.__mro__
                if "__init__" in vars(c)
                for p in inspect.signature(c.__init__).parameters.values()
                if p.name not in ("self", "name") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
        )
        for key in optimizer:
            if key != "name" and key not in allowed:
                hint = " (did you mean learning_rate?)" if key == "lr" else closest(key, allowed)  # Keras 2's name
                raise ConfigError(
                    f"{path}: trainer.optimizer.{key}: {cls.__name__} has no such parameter"
                    f"{hint}; allowed: name, {', '.join(allowed)}"
                )
        try:
            _optimizer(optimizer)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: trainer.optimizer = {dict(optimizer)!r}: {exc}") from None


def _optimizer(spec: Mapping[str, Any]) -> Any:
    import keras

    params = dict(spec)
    return keras.optimizers.get({"class_name": params.pop("name", "adam"), "config": params})


def _check(path: Path, where: str, keys: Mapping[str, Key], key: str, value: Any) -> Any:
    spec = keys.get(key)
    if spec is None:
        hint = did_you_mean(key, keys)
        raise ConfigError(f"{path}: {where}: unknown key; allowed: {', '.join(keys)}" + (f"; {hint}" if hint else ""))
    if not matches(spec.hint, value) or (spec.check is not None and not spec.check(value)):
        raise ConfigError(f"{path}: {where} = {value!r}: expected {spec.allowed or hint_text(spec.hint)}")
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


def _import(target: str, where: str, config_path: Path) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f'{where} = {target!r}: write "module:function" (e.g. "corebus.demo:digits_mlp")')
    # A factory module beside the config file or in the current folder imports as a script's would.
    for folder in (str(Path.cwd()), str(config_path.resolve().parent)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
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
    raise ConfigError(
        f"{path}: data.factory returned a {len(value)}-tuple; return (x, y), "
        "((x, y), (x_val, y_val)), a tf.data.Dataset or a dict of fit arguments"
    )


def describe_config(config: RunConfig) -> str:
    """The config as the user wrote it (``${VAR}`` kept), for ``--print-plan``."""
    lines = [f"run config {config.path} (run directory {config.run_dir})"]
    for section, values in config.sections.items():
        if values:
            lines.append(
                f"  [{section}] "
                + ", ".join(f"{k}={redact_text(_hide(repr(v), config.secrets))}" for k, v in values.items())
            )
    for template in config.templates:
        # ``${VAR}`` is kept as written; a secret written literally (a URL password, a token
        # in a webhook's query) is hidden as everywhere else.
        params = ", ".join(f"{k}={redact_text(repr(v))}" for k, v in template.items() if k != "name")
        lines.append(f"  plugin {template['name']}({params})")
    return "\n".join(lines)
