"""The README: its two commands are exactly what CI runs, its code runs, it stays short, and
every page of docs/ is reachable from it."""

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(title, 1)[1].split("\n## ", 1)[0]


def test_readme_shows_two_commands_that_ci_runs():
    commands = re.findall(r"```bash\n(.+?)\n```", section("## Two commands"))
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"CI does not run the README command: {command}"


def test_readme_is_short():
    size = len(README.encode())
    assert size <= 15_000, f"README.md is {size} bytes; move detail to docs/ (limit 15 KB)"


def test_readme_links_resolve_and_reach_every_docs_page():
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    for target in targets:
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
    linked = {Path(t).name for t in targets if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert sorted(pages - linked) == [], "docs pages a README reader cannot find"


def test_quick_start_runs(capsys):
    code = re.search(r"## Quick start.*?```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code.replace("epochs=5", "epochs=1"), "README quick start", "exec"), namespace)
    assert namespace["history"].epoch == [0]
    assert namespace["model"].optimizer.iterations.numpy() > 0


def test_one_line_move_runs_like_model_fit(tmp_path, monkeypatch):
    """The move's block as written, and the same block with its "before" line (model.fit) in
    place of the Trainer line: the same History keys and the same CSVLogger columns."""
    code = re.search(r"### Moving a `model.fit` script.*?```python\n(.*?)```", README, re.S).group(1)
    code = code.replace("epochs=5", "epochs=1")
    before = re.search(r"^# before: (.*)$", code, re.M).group(1)
    after = re.search(r"^history = corebus\.Trainer\(model\)\.fit\(.*$", code, re.M).group(0)
    assert before.replace("model.fit(", "corebus.Trainer(model).fit(") == after, "one line differs, no more"
    runs = {}
    for name, source in {"trainer": code, "model.fit": code.replace(after, before)}.items():
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)  # CSVLogger("history.csv") writes here
        namespace: dict = {}
        exec(compile(source, f"README one-line move ({name})", "exec"), namespace)
        with open("history.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        runs[name] = (namespace["history"].epoch, sorted(namespace["history"].history), list(rows[0]), len(rows))
    assert runs["trainer"] == runs["model.fit"]
    assert runs["trainer"][0] == [0]


def test_plugin_table_names_installed_plugins_importable_as_said():
    """Each row's names are installed entry points, and each class imports from the package the
    README says (corebus.plugins; the loggers from corebus.integrations) and is that entry point."""
    import importlib.metadata

    import corebus.integrations
    import corebus.plugins

    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="corebus.plugins")}
    rows = re.findall(r"^\| (`[^|]+`) \| (`[^|]+`) \|", section("## Built-in plugins"), re.M)
    assert len(rows) >= 10
    for names, classes in rows:
        names, classes = re.findall(r"`(\w+)`", names), re.findall(r"`(\w+)`", classes)
        assert len(names) == len(classes), (names, classes)
        for name, cls in zip(names, classes):
            assert name in entry_points, f"README names {name!r}, not an installed plugin"
            package = (
                corebus.integrations if name in ("tensorboard", "mlflow", "wandb", "ray_train") else corebus.plugins
            )
            assert getattr(package, cls) is entry_points[name].load(), f"{package.__name__}.{cls} is not {name!r}"
