"""Benchmarks use corebus the way a user does: only its public API.

A benchmark that reaches into engine internals measures something no user runs and breaks when
the internals move. Each ``benchmarks/*.py`` is read with ``ast``: every corebus module it
imports must be a public one, every name it takes from corebus must be public (in the module's
``__all__`` where it has one, never starting with ``_``), and no attribute it reads off corebus
starts with ``_``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))
# The modules users import (README, docs/): the package, the built-in plugins and integrations,
# the demo model and data, the plugin author's kit, and the pytest helpers for plugin authors.
PUBLIC_MODULES = {
    "corebus",
    "corebus.kit",
    "corebus.plugins",
    "corebus.integrations",
    "corebus.demo",
    "corebus.testing",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _public_names(module: str) -> set[str] | None:
    exported = getattr(importlib.import_module(module), "__all__", None)
    submodules = {
        m.rsplit(".", 1)[1]
        for m in PUBLIC_MODULES
        if m.startswith(module + ".") and m.count(".") == module.count(".") + 1
    }
    return None if exported is None else set(exported) | submodules


def violations(source: str) -> list[str]:
    """What in ``source`` is not corebus's public API, one line each."""
    found: list[str] = []
    modules: dict[str, str] = {}  # local name -> the corebus module it is bound to
    imported: set[str] = set()  # local names of objects taken from corebus
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "corebus":
                    continue
                if alias.name not in PUBLIC_MODULES:
                    found.append(f"line {node.lineno}: import {alias.name} (not a public module)")
                modules[alias.asname or "corebus"] = alias.name if alias.asname else "corebus"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "corebus":
            if node.module not in PUBLIC_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import ... (not a public module)")
                continue
            public = _public_names(node.module)
            for alias in node.names:
                local = alias.asname or alias.name
                if _private(alias.name) or (public is not None and alias.name not in public):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name} (not public)")
                elif f"{node.module}.{alias.name}" in PUBLIC_MODULES:
                    modules[local] = f"{node.module}.{alias.name}"
                else:
                    imported.add(local)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, root = [], node
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        if not isinstance(root, ast.Name) or (root.id not in modules and root.id not in imported):
            continue
        if any(_private(part) for part in chain):
            found.append(f"line {node.lineno}: {root.id}.{'.'.join(chain)} (private)")
        elif root.id in modules:
            module, first = modules[root.id], chain[0]
            public = _public_names(module)
            if public is not None and first not in public and f"{module}.{first}" not in PUBLIC_MODULES:
                found.append(f"line {node.lineno}: {root.id}.{'.'.join(chain)} ({first} is not in {module}.__all__)")
    return sorted(set(found))


def test_the_check_catches_private_use():
    source = """
import corebus
import corebus.delivery.sinks
from corebus import Trainer, _LAZY
from corebus.integrations.mlflow import _direct_target
from corebus.plugins import EarlyStopping
corebus.delivery.sinks.LOGGER_FLUSH_SECONDS = 4
corebus.engine.trainer.Trainer
EarlyStopping._check(None)
corebus.Trainer(None).fit()
"""
    found = "\n".join(violations(source))
    for expected in (
        "import corebus.delivery.sinks",
        "import _LAZY",
        "from corebus.integrations.mlflow",
        "corebus.delivery.sinks.LOGGER_FLUSH_SECONDS",
        "corebus.engine.trainer.Trainer",
        "EarlyStopping._check",
    ):
        assert expected in found, f"not flagged: {expected}\n{found}"
    assert "corebus.Trainer" not in found.replace("corebus.engine.trainer.Trainer", "")


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_uses_only_public_api(script):
    found = violations(script.read_text())
    assert found == [], f"{script.name} uses corebus internals:\n" + "\n".join(found)


def test_the_plugin_authors_kit_is_public():
    assert violations("from corebus.kit import PendingPoints, LogSink\nimport corebus.kit\ncorebus.kit.Spool\n") == []
    found = "\n".join(violations("from corebus import PendingPoints\nfrom corebus.kit import lr_owner\n"))
    assert "from corebus import PendingPoints (not public)" in found and "import lr_owner (not public)" in found
