"""Records epoch logs, like ``keras.callbacks.History``; ``fit`` returns it."""

from __future__ import annotations

from typing import Any

from corebus import hookimpl


class History:
    """``history.history`` is a dict of per-epoch lists; ``history.epoch`` the epoch indices."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.params: dict[str, Any] = {}
        self.model: Any = None

    @hookimpl(trylast=True)
    def on_train_begin(self, trainer):
        self.epoch = []
        self.params = dict(trainer.params)
        self.model = trainer.model

    # The innermost wrapper: the logs are recorded after every plugin had the chance to add to
    # them (a plateau plugin adding "learning_rate"), as Keras's History does, and also when
    # one of them raised: a snapshot of that epoch (backup, an outer wrapper) counts it as done.
    @hookimpl(wrapper=True, trylast=True)
    def on_epoch_end(self, epoch, logs):
        try:
            return (yield)
        finally:
            self.epoch.append(epoch)
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(value)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.epoch = list(state["epoch"])

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"
