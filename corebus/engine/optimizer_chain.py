"""Optimizer wrappers, walked in one place.

Keras's ``LossScaleOptimizer`` and corebus's ``GradientPipelineOptimizer`` keep the optimizer
they wrap as ``inner_optimizer``. The learning rate lives on the innermost one, and the Keras
adapter looks for its own wrapper inside a user's. No imports: the engine, the LR controller
and the gradient pipeline all use it without an import circle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def optimizer_chain(optimizer: Any) -> Iterator[Any]:
    """``optimizer``, then each ``inner_optimizer`` below it, outermost first."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def lr_owner(optimizer: Any) -> Any:
    """The optimizer that owns the learning rate: the innermost one under every wrapper."""
    chain = list(optimizer_chain(optimizer))
    return chain[-1] if chain else optimizer
