"""The walls between the three rooms (DESIGN.md), checked on the source with ast."""

import ast
from pathlib import Path

import corebus

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the same room
                yield "." + (node.module or ""), [a.name for a in node.names]
            else:
                yield node.module or "", [a.name for a in node.names]


def test_core_does_not_import_plugins_or_integrations():
    for path in (ROOT / "corebus").rglob("*.py"):
        for module, _ in imports(path):
            assert not module.startswith(("corebus.plugins", "corebus.integrations", "plugins", "integrations")), (
                f"{path.name} imports {module}: the core finds plugins only through entry points"
            )


def test_plugins_use_only_the_public_api():
    public = set(corebus.__all__)
    for room in ("plugins", "integrations"):
        for path in (ROOT / room).rglob("*.py"):
            for module, names in imports(path):
                if module == "corebus":
                    assert set(names) <= public, f"{path.name}: {set(names) - public} is not public API"
                elif module.startswith("corebus."):
                    assert module.startswith(f"corebus.{room}"), (
                        f"{path.name} imports engine internals ({module}); use `from corebus import ...`"
                    )
