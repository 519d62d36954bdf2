"""What a run snapshot holds of a run: its variables by group, and its position and plugin states.

:class:`corebus.delivery.snapshot` writes and reads them through the run context
(``_state_variables``, ``_run_state``, ``_load_run_state``), which hands the work to a
:class:`RunState` configured for its driver (the engine, or ``model.fit``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corebus.engine.optimizer_chain import lr_owner


class RunState:
    """Save and restore one run context's state.

    :param metrics: hold the metrics' variables (``model.fit`` resumes per epoch and Keras
        resets metrics at every epoch start, its compiled metrics not even built when a
        snapshot is restored: the adapter leaves them out).
    :param engine_variables: variables of the driver itself (the engine's step counter and
        RNG state), saved as the group ``engine``.
    :param keeps_seed: the context's ``seed`` (the shuffle order) is part of the state.
    """

    def __init__(
        self,
        context: Any,
        *,
        metrics: bool = True,
        engine_variables: Callable[[], list[Any]] | None = None,
        keeps_seed: bool = False,
    ) -> None:
        self.context = context
        self.metrics = metrics
        self.engine_variables = engine_variables
        self.keeps_seed = keeps_seed

    def variables(self) -> dict[str, list[Any]]:
        """Every variable a run snapshot must hold, in a stable order, by group."""
        from corebus.engine.lr import ScaledSchedule

        context = self.context
        groups: dict[str, list[Any]] = {"model": list(context.model.variables)}
        for name in sorted(context.optimizers):
            optimizer = context.optimizers[name]
            groups[f"optimizer.{name}"] = list(optimizer.variables)
            learning_rate = lr_owner(optimizer)._learning_rate
            if isinstance(learning_rate, ScaledSchedule):
                groups[f"optimizer.{name}"].append(learning_rate.multiplier)
        if self.metrics:
            groups["metrics"] = [v for metric in context.model.metrics for v in metric.variables]
        groups["gradient_pipeline"] = context.gradient_pipeline.state_variables()
        if self.engine_variables is not None:
            groups["engine"] = self.engine_variables()
        return groups

    def state(self) -> dict[str, Any]:
        """The JSON part of a run snapshot: position, LR controllers, plugin states."""
        context = self.context
        context.dispatch.log_before_snapshot()
        at_epoch_end = context._at_epoch_end
        epoch, next_batch = (context.epoch + 1, 0) if at_epoch_end else (context.epoch, context.batch + 1)
        state = {
            "micro_step": context.micro_step,
            "global_step": context.global_step,
            "epoch": epoch,
            "next_batch": next_batch,
            "stop_training": context.stop_training,
            "lr": {name: context.lr_for(name).state_dict() for name in sorted(context.optimizers)},
            "plugins": context.bus.state_dict(),
        }
        if self.keeps_seed:
            state["seed"] = context.seed
        return state

    def load(self, state: dict[str, Any]) -> None:
        context = self.context
        if self.keeps_seed:
            context.seed = int(state.get("seed", context.seed))
        context._start_steps(int(state["micro_step"]))
        for name, lr_state in state.get("lr", {}).items():
            if name in context.optimizers:
                context.lr_for(name).load_state_dict(lr_state)
        context.bus.load_state_dict(state.get("plugins", {}))
        context.epoch = int(state["epoch"])
        context.stop_training = bool(state.get("stop_training", False))
        context._resume_at = (int(state["epoch"]), int(state["next_batch"]))
        context.dispatch.emit("on_state_restored", step=context.global_step, state=state)
