"""The public API, listed: every name a user or a plugin author imports, and that each imports.

``corebus`` is the user API, ``corebus.kit`` the plugin author's building blocks,
``corebus.plugins`` / ``corebus.integrations`` the built-ins. A name added to or dropped from an
``__all__`` fails here until this list says so, so the API changes only on purpose.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import corebus

USER_API = {
    "Cadence",
    "ConfigError",
    "CorebusError",
    "KerasCallback",
    "LearningRateController",
    "MissingExtraError",
    "Monitor",
    "PluginError",
    "Preempted",
    "RunContext",
    "Trainer",
    "hookimpl",
    "installed_plugins",
    "kit",
    "load_plugin_config",
    "wrap_optimizer",
}
KIT = {
    "Alert",
    "AlertGate",
    "AlertOutbox",
    "BackendError",
    "BackendProcess",
    "BackgroundWorker",
    "GradientPipelineOptimizer",
    "InProcessBackend",
    "LOGGER_FLUSH_SECONDS",
    "LazyLogs",
    "LogSink",
    "LoggedStep",
    "LoggerOutbox",
    "OutboxTarget",
    "PendingPoints",
    "PluginBus",
    "RetryLater",
    "RunLock",
    "RunSnapshot",
    "ScaledSchedule",
    "SnapshotError",
    "Spool",
    "arrow_filesystem",
    "atomic_path",
    "check_choice",
    "check_number",
    "check_remote_writable",
    "check_writable",
    "compare_reports",
    "delete_path",
    "fsync_path",
    "is_remote",
    "mirror_directory",
    "optimizer_names",
    "read_spool",
    "redact",
    "render_report",
    "replay_spool",
    "require_module",
    "run_status",
    "scalar_values",
    "step_points",
    "write_report",
}
MODULES = {"corebus": USER_API, "corebus.kit": KIT}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_all_is_the_listed_api(module):
    assert set(importlib.import_module(module).__all__) == MODULES[module]


@pytest.mark.parametrize("module, name", [(m, n) for m in sorted(MODULES) for n in sorted(MODULES[m])])
def test_each_public_name_imports(module, name):
    namespace: dict = {}
    exec(f"from {module} import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module(module), name)


def test_the_kit_names_still_import_from_corebus():
    """Plugins written before corebus.kit took these from ``corebus``: they keep working (the
    same objects), though ``corebus.__all__`` no longer lists them."""
    for name in sorted(KIT):
        assert getattr(corebus, name) is getattr(corebus.kit, name), name
    assert not KIT & set(corebus.__all__)
    with pytest.raises(ImportError, match="no_such_name"):
        exec("from corebus import no_such_name", {})


@pytest.mark.parametrize("package", ["corebus.plugins", "corebus.integrations"])
def test_every_builtin_imports_from_its_package(package):
    """The README promises every built-in under ``corebus.plugins`` / ``corebus.integrations``."""
    module = importlib.import_module(package)
    assert module.__all__
    for name in module.__all__:
        cls = getattr(module, name)
        assert isinstance(cls, type) and cls.__name__ == name


def test_import_corebus_and_the_kit_stays_light():
    """The kit is for plugin modules, which ``corebus plugins`` lists without TensorFlow."""
    code = (
        "import sys, corebus, corebus.kit; from corebus.kit import LogSink, atomic_path; "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("module, name", [(m, n) for m in sorted(MODULES) for n in sorted(MODULES[m])])
def test_each_public_class_and_function_says_what_it_is(module, name):
    """``help(corebus.RunContext)`` showed nothing while its docstring sat after a class attribute."""
    obj = getattr(importlib.import_module(module), name)
    if callable(obj):
        assert (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"
