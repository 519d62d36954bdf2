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


class Preempted(SystemExit):
    """Training was asked to stop by a signal (SIGTERM, or an opt-in requeue signal) and
    stopped at a step boundary, after a snapshot of that step: the process exits with
    ``128 + signal`` (what a scheduler expects of a process its signal ended)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        import signal

        return f"stopped by {signal.Signals(self.signum).name} at a step boundary"
