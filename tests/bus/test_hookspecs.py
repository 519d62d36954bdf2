"""Every hook is documented, indexed in __all__, and its signature is pinned."""

import inspect
import re

import pytest

from corebus.bus import hookspecs

PINNED = {
    "on_train_begin": "(trainer, logs)",
    "on_train_end": "(trainer, logs)",
    "on_exception": "(trainer, exception)",
    "on_epoch_begin": "(trainer, epoch, logs)",
    "on_epoch_end": "(trainer, epoch, logs)",
    "on_train_batch_begin": "(trainer, batch, logs)",
    "on_train_batch_end": "(trainer, batch, logs)",
    "on_test_begin": "(trainer, logs)",
    "on_test_end": "(trainer, logs)",
    "on_test_batch_begin": "(trainer, batch, logs)",
    "on_test_batch_end": "(trainer, batch, logs)",
    "on_predict_begin": "(trainer, logs)",
    "on_predict_end": "(trainer, logs)",
    "on_predict_batch_begin": "(trainer, batch, logs)",
    "on_predict_batch_end": "(trainer, batch, logs)",
    "transform_gradients": "(trainer, gradients, variables, optimizer_name)",
    "gradient_accumulation_steps": "(trainer, optimizer_name)",
    "on_checkpoint_saved": "(trainer, filepath, step, metadata)",
    "on_state_restored": "(trainer, step, state)",
    "on_log": "(trainer, kind, step, logs)",
    "on_log_steps": "(trainer, records)",
    "on_alert": "(trainer, alert)",
}


def test_all_is_the_complete_index():
    defined = {
        name for name, obj in vars(hookspecs).items() if inspect.isfunction(obj) and hasattr(obj, "corebus_spec")
    }
    assert defined == set(hookspecs.__all__)
    assert set(PINNED) == defined


@pytest.mark.parametrize("name", hookspecs.__all__)
def test_hook_is_documented_and_pinned(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec)
    assert doc and len(doc.splitlines()[0]) > 10, f"{name} has no summary line"
    params = list(inspect.signature(spec).parameters)
    documented = re.findall(r":param (\w+):", doc)
    assert documented == params, f"{name}: document every argument, in order"
    assert str(inspect.signature(spec)) == PINNED[name]
    assert "trainer" in params, "every hook receives the trainer"


def test_spec_bodies_are_docstring_only():
    import ast

    tree = ast.parse(inspect.getsource(hookspecs))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            assert len(node.body) == 1 and isinstance(node.body[0], ast.Expr), node.name
