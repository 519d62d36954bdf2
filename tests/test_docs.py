"""docs/writing-a-plugin.md documents every hook with the hookspec's own signature.

The guide's hooks reference lists each hook as a bullet "- `name(arg, arg, ...)`: when it
fires". This test parses those bullets and compares them with ``corebus.hookspecs``: a hook
added to ``__all__`` but not to the guide, or a signature changed in one place only, fails.
"""

import inspect
import re
from pathlib import Path

import pytest

from corebus import hookspecs

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
    assert docs[hook] == expected, f"{hook}: the guide says ({', '.join(docs[hook])}), the hookspec ({', '.join(expected)})"


def test_guide_links_resolve():
    text = GUIDE.read_text()
    for target in re.findall(r"\]\((\.\./[^)#]+)", text):
        assert (GUIDE.parent / target).resolve().exists(), target
