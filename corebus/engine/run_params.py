"""What loggers record as run parameters: the run's configuration, never its running state."""

from __future__ import annotations

import json
from typing import Any


def _plain(value: Any) -> bool:
    """A config value worth logging as a run param: a scalar, or a list/tuple of scalars."""
    scalar = (int, float, str, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value))


def _constructor_parameters(cls: type) -> set[str]:
    import inspect

    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return set()
    return {
        name
        for name, p in signature.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"
    }


def _model_summary(context: Any) -> dict[str, Any]:
    """Loss, metrics and parameter counts of the run's model (names, not objects)."""
    model = context.model

    def names(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: names(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [names(v) for v in value]
        return (
            value
            if isinstance(value, str) or value is None
            else getattr(value, "name", getattr(value, "__name__", type(value).__name__))
        )

    config: dict[str, Any] = {}
    if getattr(model, "compiled", False):
        try:
            config = model.get_compile_config() or {}
        except Exception:  # a compile argument Keras cannot serialise: names below
            config = {}
    summary: dict[str, Any] = {
        "loss": names(config.get("loss") or getattr(model, "loss", None) or getattr(context, "loss", None)),
        "metrics": names(config.get("metrics") or getattr(context, "metrics", None) or []),
    }
    if getattr(model, "built", False) and model.weights:
        import numpy as np

        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        total = sum(int(np.prod(v.shape)) for v in model.weights)
        summary.update(total_params=total, trainable_params=trainable, non_trainable_params=total - trainable)
    return summary


def run_params(context: Any) -> dict[str, Any]:
    """What loggers record as run parameters: configuration only (the fit arguments, each
    optimizer's config, each plugin's constructor arguments or ``get_config()``, and the
    model's loss, metrics and parameter counts, as ``mlflow.tensorflow.autolog`` logs
    them), JSON-safe, with secret-looking values redacted. A plugin's running state
    (``wait``, ``best``...) is not configuration and stays out."""
    from corebus.delivery.sinks import redact

    def jsonable(value: Any) -> Any:
        return json.loads(json.dumps(value, default=str))

    plugins = {}
    for name, plugin in context.bus.plugins.items():
        if callable(getattr(plugin, "get_config", None)):
            config = plugin.get_config()
        else:
            accepted = _constructor_parameters(type(plugin))
            config = {k: v for k, v in vars(plugin).items() if k in accepted and _plain(v)}
        plugins[name] = jsonable(config)
    optimizer = {name: jsonable(opt.get_config()) for name, opt in context.optimizers.items()}
    return redact(
        {
            "fit": jsonable(context.params),
            "optimizer": optimizer,
            "plugins": plugins,
            "model": jsonable(_model_summary(context)),
        }
    )
