"""The walls between the rooms (DESIGN.md), checked on the source with ast.

Inside ``corebus/`` the rooms are ``bus`` (hooks, registry, cadence), ``engine`` (the trainer),
``delivery`` (sinks, snapshots, alerts) and ``app`` (CLI, config runs, report); outside it,
``plugins`` and ``integrations`` use only the public API."""

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


# What each room of the core may import from the others: the bus is the floor, delivery sits on
# it, the engine uses both, the app uses everything. Nothing in the core imports the app except
# the CLI's own entry (``__main__``).
ROOM_MAY_IMPORT = {
    "bus": {"bus"},
    "delivery": {"bus", "delivery"},
    "engine": {"bus", "delivery", "engine"},
    "app": {"bus", "delivery", "engine", "app"},
}
ROOMS = tuple(ROOM_MAY_IMPORT)


def room_violations(path: Path, room: str) -> list[str]:
    found = []
    for module, _ in imports(path):
        parts = module.split(".")
        if parts[0] == "corebus" and len(parts) > 1 and parts[1] in ROOMS and parts[1] not in ROOM_MAY_IMPORT[room]:
            found.append(
                f"{room}/{path.name} imports {module}: the {room} room may import only {sorted(ROOM_MAY_IMPORT[room])}"
            )
        if module.startswith("."):
            found.append(f"{room}/{path.name}: relative import {module}; spell the room (corebus.{room}...)")
    return found


def test_each_room_of_the_core_imports_only_the_rooms_below_it():
    for room in ROOMS:
        assert (ROOT / "corebus" / room / "__init__.py").read_text().startswith('"""'), f"{room} needs its docstring"
        for path in (ROOT / "corebus" / room).glob("*.py"):
            assert room_violations(path, room) == []


def test_the_engines_other_faces_import_no_app_module():
    # The adapter runs the engine's plugins inside model.fit; like the engine it needs no CLI,
    # config run or report. (The facades ``corebus`` and ``corebus.kit`` re-export from every room.)
    for name in ("keras_adapter.py", "testing.py", "errors.py"):
        for module, _ in imports(ROOT / "corebus" / name):
            assert not module.startswith("corebus.app"), f"{name} imports {module}"


def test_the_room_check_flags_an_engine_import_from_the_bus(tmp_path):
    source = tmp_path / "bus_module.py"
    source.write_text("from corebus.engine.trainer import Trainer\nfrom corebus.bus.cadence import Cadence\n")
    found = room_violations(source, "bus")
    assert len(found) == 1 and "corebus.engine.trainer" in found[0]


def wall_violations(path: Path, room: str) -> list[str]:
    """What a module of ``room`` (plugins, integrations) imports from the core that is not public.

    The public API for plugins is the user API (``corebus.__all__``) and the plugin author's kit
    (``corebus.kit.__all__``). The kit's names also import from ``corebus`` (plugins written
    before ``corebus.kit`` existed), so both spellings pass; nothing else of the core does."""
    user, kit = set(corebus.__all__), set(corebus.kit.__all__)
    found = []
    for module, names in imports(path):
        if module == "corebus":
            found += [f"{path.name}: {name} is not public API" for name in sorted(set(names) - user - kit)]
        elif module == "corebus.kit":
            found += [f"{path.name}: {name} is not in corebus.kit" for name in sorted(set(names) - kit)]
        elif module.startswith("corebus.") and not module.startswith(f"corebus.{room}"):
            found.append(
                f"{path.name} imports engine internals ({module}); "
                "use `from corebus import ...` or `from corebus.kit import ...`"
            )
    return found


def test_plugins_use_only_the_public_api():
    for room in ("plugins", "integrations"):
        for path in (ROOT / room).rglob("*.py"):
            assert wall_violations(path, room) == []


def test_the_wall_check_flags_internals_and_passes_the_kit(tmp_path):
    source = tmp_path / "plugin.py"
    source.write_text(
        "from corebus.kit import LogSink, atomic_path\nfrom corebus import hookimpl, Spool\n"
    )  # Spool: a kit name, old spelling
    assert wall_violations(source, "plugins") == []
    source.write_text(
        "from corebus.delivery.sinks import Spool\nfrom corebus import _LAZY\nfrom corebus.kit import lr_owner\n"
    )
    found = "\n".join(wall_violations(source, "plugins"))
    for expected in ("(corebus.delivery.sinks)", "_LAZY is not public API", "lr_owner is not in corebus.kit"):
        assert expected in found, found


# Keras attributes that are not Keras's API: a plugin reaching them breaks on a Keras release.
# The LR goes through trainer.lr / trainer.lr_for(name) (value, set, multiplier, installed_schedule).
PRIVATE_KERAS = {"_learning_rate"}


def test_plugins_reach_no_private_keras_attribute():
    for room in ("plugins", "integrations"):
        for path in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute):
                    assert node.attr not in PRIVATE_KERAS, (
                        f"{path.name}:{node.lineno} reads .{node.attr}; use trainer.lr / trainer.lr_for(name)"
                    )
