"""One walk through optimizer wrappers (corebus.engine.optimizer_chain), used by the engine's LR
owner, the gradient pipeline's wrapper and the Keras adapter alike."""

from __future__ import annotations

import ast
from pathlib import Path

import keras

from corebus.engine.gradients import GradientPipelineOptimizer
from corebus.engine.optimizer_chain import lr_owner, optimizer_chain

ROOT = Path(__file__).resolve().parents[2]


def test_the_chain_goes_through_keras_and_corebus_wrappers():
    sgd = keras.optimizers.SGD(0.1)
    scaled = keras.optimizers.LossScaleOptimizer(sgd)
    piped = GradientPipelineOptimizer(scaled)
    assert list(optimizer_chain(piped))[0] is piped
    assert list(optimizer_chain(piped))[-1] is sgd
    assert list(optimizer_chain(scaled)) == [scaled, sgd]
    assert lr_owner(piped) is lr_owner(scaled) is lr_owner(sgd) is sgd
    assert piped.inner_optimizer is sgd  # the wrapper's LR owner is the same walk's answer
    assert lr_owner(None) is None  # a run context before the model is compiled


def test_no_other_module_walks_inner_optimizer_by_hand():
    """The walk lived in three places (context, gradients, keras_adapter) with three rules."""
    for path in (ROOT / "corebus").rglob("*.py"):
        if path.name == "optimizer_chain.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr":
                args = node.args
                walks = len(args) > 1 and isinstance(args[1], ast.Constant) and args[1].value == "inner_optimizer"
                assert not walks, f"{path.name}:{node.lineno} walks inner_optimizer; use corebus.engine.optimizer_chain"
