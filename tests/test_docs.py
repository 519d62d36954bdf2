"""docs/writing-a-plugin.md documents every hook with the hookspec's own signature.

The guide's hooks reference lists each hook as a bullet "- `name(arg, arg, ...)`: when it
fires". This test parses those bullets and compares them with ``corebus.bus.hookspecs``: a hook
added to ``__all__`` but not to the guide, or a signature changed in one place only, fails.
"""

import inspect
import re
from pathlib import Path

import pytest

from corebus.bus import hookspecs

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "writing-a-plugin.md"
ENTRY = re.compile(r"^- `(\w+)\(([^)]*)\)`:", re.M)


def documented():
    text = GUIDE.read_text()
    reference = text.split("## Hooks reference", 1)[1]
    entries = ENTRY.findall(reference)
    names = [name for name, _ in entries]
    assert len(names) == len(set(names)), f"hooks documented twice: {sorted({n for n in names if names.count(n) > 1})}"
    return {name: [a.strip() for a in args.split(",") if a.strip()] for name, args in entries}


def test_guide_documents_exactly_the_hooks_in_all():
    docs = documented()
    assert sorted(set(hookspecs.__all__) - set(docs)) == [], "hooks missing from docs/writing-a-plugin.md"
    assert sorted(set(docs) - set(hookspecs.__all__)) == [], "the guide documents hooks that do not exist"
    assert list(docs) == list(hookspecs.__all__), "the reference follows hookspecs.__all__'s order"


@pytest.mark.parametrize("hook", hookspecs.__all__)
def test_guide_signature_matches_the_hookspec(hook):
    docs = documented()
    assert hook in docs, f"{hook} is missing from docs/writing-a-plugin.md"
    expected = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert docs[hook] == expected, (
        f"{hook}: the guide says ({', '.join(docs[hook])}), the hookspec ({', '.join(expected)})"
    )


def test_guide_links_resolve():
    text = GUIDE.read_text()
    for target in re.findall(r"\]\((\.\./[^)#]+)", text):
        assert (GUIDE.parent / target).resolve().exists(), target


# --------------------------------------------------------------------------- every docs page

DOCS = GUIDE.parent
PAGES = sorted(DOCS.glob("*.md"))
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_links_resolve(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).resolve().exists(), f"{page.name} links to a missing file: {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_code_is_python(page):
    """Fragments (which use a `model` defined elsewhere) at least parse; whole programs run in
    tests (the custom-steps GAN in test_examples.py, the README's blocks in test_readme.py)."""
    for number, code in enumerate(PYTHON_BLOCK.findall(page.read_text())):
        compile(code, f"{page.name} block {number}", "exec")


def test_moving_from_model_fit_lists_every_keras_argument():
    """The table names every argument of Keras's fit / compile / evaluate / predict of the Keras
    version in use, so a new Keras argument shows up here."""
    import inspect

    import keras

    text = (DOCS / "moving-from-model-fit.md").read_text()
    table_cells = set(re.findall(r"^\| ([^|]+) \|", text, re.M))
    documented = {name for cell in table_cells for name in re.findall(r"`(\w+)`", cell)}
    for method in (keras.Model.compile, keras.Model.fit, keras.Model.evaluate, keras.Model.predict):
        arguments = [
            p.name
            for p in inspect.signature(method).parameters.values()
            if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        missing = sorted(set(arguments) - documented)
        assert missing == [], f"docs/moving-from-model-fit.md does not list {method.__name__}'s {missing}"
