"""Errors raised before training starts (configuration) and while it runs (plugins)."""

from __future__ import annotations


class CorebusError(Exception):
    """Base class of every corebus error."""


class ConfigError(CorebusError, ValueError):
    """Bad input caught before training starts: unknown plugin, bad params, bad config file."""


class MissingExtraError(ConfigError, ImportError):
    """A plugin needs an optional dependency that is not installed."""

    def __init__(self, what: str, module: str, extra: str):
        self.module = module
        self.extra = extra
        super().__init__(
            f"{what} needs the optional package {module!r}, which is not installed. "
            f'Install it with: pip install "corebus[{extra}]"'
        )


class PluginError(CorebusError):
    """A plugin raised inside a hook; names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, error: BaseException):
        self.plugin = plugin
        self.hook = hook
        self.error = error
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(error).__name__}: {error}")


def require_module(module: str, *, extra: str, what: str):
    """Import an optional SDK, or raise one clear error naming the pip command to fix it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(what, module, extra) from exc
