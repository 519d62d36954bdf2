"""The event bus: a thin layer over ``pluggy.PluginManager``.

What it adds to pluggy, and why:
- **order**: plugins are called in the order the user listed them (Keras list order), adjusted
  by declared ``runs_after`` / ``runs_before`` constraints and pluggy's tryfirst/trylast;
  ``describe()`` prints the resulting hook plan;
- **ownership**: a plugin may declare ``controls = {"lr.schedule"}``; two plugins controlling
  the same thing are rejected at registration, naming both;
- **error policy** per plugin (``error_policy = "raise" | "warn" | "disable"``, with
  ``max_failures``) and errors that name the plugin and the hook;
- **hot path**: callers for hooks nobody implements are ``None`` (the engine skips them), the
  others call the implementations directly (:func:`_direct_caller`) where pluggy's general
  machinery has nothing to do, and per-plugin timing is compiled in only when profiling is on;
- **tracing**: ``COREBUS_TRACE=1`` logs every hook call to the ``corebus.trace`` logger.
"""

from __future__ import annotations

import difflib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pluggy

from corebus.bus import hookspecs
from corebus.bus.registry import plugin_name
from corebus.errors import ConfigError, PluginError

log = logging.getLogger("corebus")
trace_log = logging.getLogger("corebus.trace")

hookimpl = pluggy.HookimplMarker("corebus")

ERROR_POLICIES = ("raise", "warn", "disable", "propagate")  # propagate: the error itself, unwrapped

# Hooks where a failing plugin must not mask the original problem: always warn.
_NEVER_RAISE = {"on_exception"}


class PluginBus:
    """Registers plugins for one run and calls their hooks.

    :param plugins: ``(name, plugin)`` pairs in the order the user listed them.
    :param profile: record host time per plugin per hook (see :meth:`profile_report`).
    """

    def __init__(self, plugins: Iterable[tuple[str, object]] = (), *, profile: bool = False):
        self.pm = pluggy.PluginManager("corebus")
        self.pm.add_hookspecs(hookspecs)
        self.profile_enabled = profile
        self.timings: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        self.failures: dict[str, int] = defaultdict(int)
        self.streaks: dict[str, int] = defaultdict(int)  # consecutive failures (``disable`` policy)
        self.disabled: set[str] = set()
        self.plugins: dict[str, object] = {}
        ordered = _ordered(_unique_names(list(plugins)))
        _check_controls(ordered)
        for name, plugin in ordered:
            self._register(name, plugin)
        self.plugins = dict(ordered)
        self._enforce_list_order([name for name, _ in ordered])
        self._tracing = bool(os.environ.get("COREBUS_TRACE"))
        if self._tracing:
            self._enable_tracing()
        self._callers = {
            hook: self._make_caller(getattr(self.pm.hook, hook), self._tracing) for hook in hookspecs.__all__
        }

    # ------------------------------------------------------------------ registration

    def _register(self, name: str, plugin: object) -> None:
        policy = getattr(plugin, "error_policy", "raise")
        if policy not in ERROR_POLICIES:
            raise ConfigError(f"plugin {name!r}: error_policy={policy!r} is not one of {', '.join(ERROR_POLICIES)}")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"plugin {name!r} does not match the hook specs: {exc}") from exc
        try:
            self.pm.check_pending()  # a @hookimpl whose name is no hook would never be called
        except pluggy.PluginValidationError:
            raise ConfigError(_unknown_hooks_message(name, self.pm.get_hookcallers(plugin) or [])) from None
        for caller in self.pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    impl.function = self._guard(name, plugin, caller.name, impl.function, policy)

    @staticmethod
    def _make_caller(hook_caller: Any, tracing: bool) -> Callable[..., Any] | None:
        if not hook_caller.get_hookimpls():
            return None
        if tracing:  # pluggy's monitoring sees every call
            return hook_caller
        return _direct_caller(hook_caller) or hook_caller

    def _enforce_list_order(self, names: list[str]) -> None:
        """Within each tier (tryfirst, plain, trylast) call plugins in list order.

        pluggy calls plain impls last-registered-first but trylast impls first-registered-first,
        so no single registration order gives list order in every tier; re-sort instead. pluggy
        has no public way to order implementations within a tier, so this rewrites the caller's
        ``_hookimpls`` list; pyproject pins ``pluggy<2`` for it.
        """
        position = {name: i for i, name in enumerate(names)}
        for hook in hookspecs.__all__:
            caller = getattr(self.pm.hook, hook)
            impls = caller._hookimpls
            wrappers = [i for i in impls if i.wrapper or i.hookwrapper]
            plain = [i for i in impls if not (i.wrapper or i.hookwrapper)]
            call_order = sorted(
                plain, key=lambda i: (0 if i.tryfirst else 2 if i.trylast else 1, position.get(i.plugin_name, 0))
            )
            impls[:] = list(reversed(call_order)) + wrappers

    def _guard(self, name: str, plugin: object, hook: str, function: Callable, policy: str) -> Callable:
        """Wrap one hook implementation with the plugin's error policy (and timing if on)."""
        bus = self
        max_failures = int(getattr(plugin, "max_failures", 3) or 3)
        if hook in _NEVER_RAISE:
            policy = "warn"

        def on_error(exc: Exception) -> None:
            if isinstance(exc, ConfigError):
                raise exc  # bad input: its message already says what to fix
            if policy == "propagate":
                raise exc  # Keras callbacks: their own exceptions, as model.fit raises them
            if policy == "raise":
                raise PluginError(name, hook, exc) from exc
            bus.failures[name] += 1
            if policy == "warn":
                log.warning("plugin %r failed in %s: %s: %s", name, hook, type(exc).__name__, exc)
                return
            # disable: one warning per streak, then silence until the K-th consecutive failure
            bus.streaks[name] += 1
            if bus.streaks[name] == 1:
                log.warning(
                    "plugin %r failed in %s: %s: %s (it is disabled after %d failures in a row)",
                    name,
                    hook,
                    type(exc).__name__,
                    exc,
                    max_failures,
                )
            else:
                log.debug("plugin %r failed in %s again: %s: %s", name, hook, type(exc).__name__, exc)
            if bus.streaks[name] >= max_failures:
                bus.disable(name)

        streaks, disabled = self.streaks, self.disabled
        resets_streak = policy == "disable"

        if self.profile_enabled:
            timing = self.timings[(name, hook)]
            perf_counter = time.perf_counter

            def guarded(*args):
                if name in disabled:
                    return None
                start = perf_counter()
                try:
                    result = function(*args)
                    if resets_streak and streaks[name]:
                        streaks[name] = 0
                    return result
                except Exception as exc:
                    on_error(exc)
                finally:
                    timing[0] += 1
                    timing[1] += perf_counter() - start

        else:

            def guarded(*args):  # runs once per hook call: kept to a few lookups
                if name in disabled:
                    return None
                try:
                    result = function(*args)
                    if resets_streak and streaks[name]:
                        streaks[name] = 0
                    return result
                except Exception as exc:
                    on_error(exc)

        guarded.__wrapped__ = function
        return guarded

    def disable(self, name: str) -> None:
        """Stop calling a plugin (after too many failures under the ``disable`` policy)."""
        if name not in self.disabled:
            log.warning(
                "plugin %r disabled after %d failures in a row; the run goes on without it",
                name,
                self.streaks[name] or self.failures[name],
            )
            self.disabled.add(name)

    def _enable_tracing(self) -> None:
        def before(hook_name, impls, kwargs):
            trace_log.debug("%s -> %s", hook_name, [i.plugin_name for i in reversed(impls)])

        def after(outcome, hook_name, impls, kwargs):
            if outcome.exception is not None:
                trace_log.debug("%s raised %r", hook_name, outcome.exception)

        self.pm.add_hookcall_monitoring(before, after)

    # ------------------------------------------------------------------ calling

    def caller(self, hook: str) -> Callable[..., Any] | None:
        """The caller of ``hook`` (keyword arguments, as pluggy's), or ``None`` when no plugin
        implements it.

        The engine caches these once per run and skips ``None``: a hook nobody implements
        costs nothing per batch.
        """
        return self._callers[hook]

    def caller_without(self, hook: str, plugins: Iterable[object]) -> Callable[..., Any] | None:
        """The caller of ``hook`` leaving ``plugins`` out (``None`` when no other plugin
        implements it): batch ``on_log`` records skip the plugins that take ``on_log_steps``."""
        plugins = list(plugins)
        if not plugins:
            return self._callers[hook]
        return self._make_caller(self.pm.subset_hook_caller(hook, plugins), self._tracing)

    def call(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call ``hook`` on every implementing plugin (no-op when none does)."""
        caller = self._callers[hook]
        if caller is None:
            return []
        return caller(**kwargs)

    def implementations(self, hook: str) -> list[tuple[str, Any]]:
        """``(plugin name, hookimpl)`` pairs in the order they are called."""
        hook_caller = getattr(self.pm.hook, hook)
        return [(impl.plugin_name, impl) for impl in reversed(hook_caller.get_hookimpls())]

    def chain(self, hook: str, value_arg: str, value: Any, **kwargs: Any) -> Any:
        """Call ``hook`` feeding each implementation the previous one's result.

        Used for ``transform_gradients``: clipping after accumulation after logging, in hook
        order. ``None`` results leave the value unchanged.
        """
        for _, impl in self.implementations(hook):
            available = {value_arg: value, **kwargs}
            result = impl.function(*[available[arg] for arg in impl.argnames])
            if result is not None:
                value = result
        return value

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Every plugin's ``state_dict()``, keyed by plugin name."""
        return {
            name: plugin.state_dict()
            for name, plugin in self.plugins.items()
            if callable(getattr(plugin, "state_dict", None))
        }

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        for name, state in states.items():
            plugin = self.plugins.get(name)
            if plugin is not None and callable(getattr(plugin, "load_state_dict", None)):
                plugin.load_state_dict(state)

    # ------------------------------------------------------------------ reporting

    def describe(self) -> str:
        """The hook plan: which plugin runs at which hook, in call order."""
        lines = [f"plugins: {', '.join(self.plugins) or '(none)'}"]
        for hook in hookspecs.__all__:
            impls = self.implementations(hook)
            if not impls:
                continue
            names = []
            for name, impl in impls:
                marks = [m for m in ("tryfirst", "trylast", "wrapper") if getattr(impl, m)]
                names.append(name + (f" [{','.join(marks)}]" if marks else ""))
            lines.append(f"  {hook:<24} {' -> '.join(names)}")
        return "\n".join(lines)

    def profile_report(self) -> dict[str, dict[str, dict[str, float]]]:
        """Host time per plugin per hook: ``{plugin: {hook: {"calls", "seconds"}}}``."""
        report: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        for (name, hook), (calls, seconds) in self.timings.items():
            if calls:
                report[name][hook] = {"calls": calls, "seconds": seconds}
        return dict(report)


def _direct_caller(hook_caller: Any) -> Callable[..., list[Any]] | None:
    """A caller that runs the implementations of a hook itself, in pluggy's order with pluggy's
    result (the list of non-``None`` results), or ``None`` where pluggy's own machinery is needed
    (wrappers, ``firstresult``).

    Batch hooks run once per step, and pluggy's general path (argument checks, a copy of the
    implementation list, wrapper bookkeeping) measured about as long as a plain logger's
    ``on_log`` itself. The bus registers every plugin before its callers are made and never
    after, so the plan below cannot go stale.
    """
    impls = list(reversed(hook_caller.get_hookimpls()))
    if any(impl.wrapper or impl.hookwrapper for impl in impls):
        return None
    if hook_caller.spec is not None and hook_caller.spec.opts.get("firstresult"):
        return None
    plan = tuple((impl.function, tuple(impl.argnames)) for impl in impls)
    name = hook_caller.name

    def call(**kwargs: Any) -> list[Any]:
        results = []
        for function, argnames in plan:
            try:
                args = [kwargs[argname] for argname in argnames]
            except KeyError as exc:
                raise pluggy.HookCallError(f"hook {name} call must provide argument {exc.args[0]!r}") from None
            result = function(*args)
            if result is not None:
                results.append(result)
        return results

    return call


def _unknown_hooks_message(name: str, callers: Iterable[Any]) -> str:
    """Names each ``@hookimpl`` method of a plugin that matches no hook, with the closest hook."""
    parts = []
    for caller in callers:
        if caller.has_spec():
            continue
        close = difflib.get_close_matches(caller.name, hookspecs.__all__, n=1)
        parts.append(f"{caller.name}" + (f" (did you mean {close[0]}?)" if close else ""))
    return (
        f"plugin {name!r}: @hookimpl method {', '.join(parts)} is no corebus hook, so it would never be "
        f"called; rename it to a hook of corebus.bus.hookspecs, or mark it @hookimpl(optionalhook=True)"
    )


def _unique_names(pairs: list[tuple[str, object]]) -> list[tuple[str, object]]:
    seen: dict[str, int] = {}
    unique = []
    for name, plugin in pairs:
        if any(plugin is other for _, other in unique):
            raise ConfigError(f"plugin {name!r} was given twice (the same instance)")
        seen[name] = seen.get(name, 0) + 1
        unique.append((name if seen[name] == 1 else f"{name}#{seen[name]}", plugin))
    return unique


def _matches(name: str, plugin: object, ref: str) -> bool:
    return ref == name or ref == type(plugin).__name__ or ref == plugin_name(plugin)


def _ordered(pairs: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """List order, adjusted by ``runs_after`` / ``runs_before`` (stable topological sort)."""
    after: dict[int, set[int]] = {i: set() for i in range(len(pairs))}
    for i, (_name, plugin) in enumerate(pairs):
        for ref in getattr(plugin, "runs_after", ()) or ():
            after[i] |= {j for j, (n, p) in enumerate(pairs) if j != i and _matches(n, p, ref)}
        for ref in getattr(plugin, "runs_before", ()) or ():
            for j, (n, p) in enumerate(pairs):
                if j != i and _matches(n, p, ref):
                    after[j].add(i)
    done: list[int] = []
    pending = list(range(len(pairs)))
    while pending:
        ready = [i for i in pending if after[i] <= set(done)]
        if not ready:
            cycle = ", ".join(pairs[i][0] for i in pending)
            raise ConfigError(f"plugin ordering constraints form a cycle among: {cycle}")
        done.append(ready[0])
        pending.remove(ready[0])
    return [pairs[i] for i in done]


def _check_controls(pairs: list[tuple[str, object]]) -> None:
    owners: dict[str, str] = {}
    for name, plugin in pairs:
        for key in getattr(plugin, "controls", ()) or ():
            if key in owners:
                raise ConfigError(
                    f"plugins {owners[key]!r} and {name!r} both control {key!r}; "
                    f"keep one of them (a schedule composes with a plateau multiplier, "
                    f"two schedules do not)"
                )
            owners[key] = name
