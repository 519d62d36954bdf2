"""The engine is one object per job: small modules, no import circles, composed parts."""

import ast
from pathlib import Path

import keras

import corebus
from corebus.engine.context import RunContext
from corebus.engine.dispatch import Dispatch
from corebus.engine.loop import EpochLoop
from corebus.engine.packed_logs import PackedLogs
from corebus.engine.run_state import RunState
from corebus.engine.step import CompiledStep
from corebus.keras_adapter import KerasRunContext
from corebus.testing import make_trainer, tiny_model

CORE = Path(corebus.__file__).parent
MAX_LINES = 500


def _engine_modules() -> list[Path]:
    return sorted((CORE / "engine").glob("*.py")) + [CORE / "keras_adapter.py"]


def test_engine_modules_are_small_and_say_their_job():
    for path in _engine_modules():
        source = path.read_text()
        lines = source.count("\n")
        assert lines <= MAX_LINES, f"{path.name}: {lines} lines (at most {MAX_LINES})"
        assert ast.get_docstring(ast.parse(source)), f"{path.name} has no module docstring"


def _corebus_imports(path: Path, modules: set[str]) -> set[str]:
    """The corebus modules ``path`` imports, at any level (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("corebus"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules


def test_no_corebus_module_imports_one_that_imports_it_back():
    paths = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        paths[name] = path
    graph = {name: _corebus_imports(path, set(paths)) - {"corebus"} for name, path in paths.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return False

    circles = sorted((a, b) for a in graph for b in graph[a] if b != a and reaches(b, a))
    assert circles == []


def test_the_gradient_pipeline_holds_the_dispatch_not_the_context():
    context = RunContext()
    assert context.gradient_pipeline.hooks is context.dispatch
    assert "corebus.engine.context" not in _corebus_imports(
        CORE / "engine" / "gradients.py", {"corebus.engine.context"}
    )


def test_trainer_hands_each_job_to_its_own_object():
    trainer = make_trainer()
    assert isinstance(trainer.dispatch, Dispatch) and trainer.dispatch.context is trainer
    assert isinstance(trainer.compiled_step, CompiledStep)
    assert isinstance(trainer.packed_logs, PackedLogs)
    assert isinstance(trainer.loop, EpochLoop)
    assert isinstance(trainer.run_state, RunState)
    # no override bounces between the engine, the context and the adapter: each driver
    # configures the parts instead
    for cls in (corebus.Trainer, KerasRunContext):
        overridden = {"_logged_steps", "_state_variables", "_run_state", "_load_run_state"} & set(vars(cls))
        assert overridden == set(), f"{cls.__name__} overrides {overridden}"


def test_each_driver_snapshots_what_it_resumes(tiny_data):
    x, y = tiny_data
    trainer = make_trainer()
    trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    groups = trainer._state_variables()
    assert list(groups) == ["model", "optimizer.default", "metrics", "gradient_pipeline", "engine"]
    assert groups["engine"][0] is trainer._step_counter
    assert trainer._run_state()["seed"] == trainer.seed

    callback = corebus.KerasCallback()
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert list(callback.context._state_variables()) == ["model", "optimizer.default", "gradient_pipeline"]
    assert "seed" not in callback.context._run_state()
    assert isinstance(callback.context.model, keras.Model)
