"""Keras callbacks inside the engine: ``Trainer.fit(callbacks=[...])``.

The user's ``keras.callbacks.Callback`` objects (Keras's own, W&B's, MLflow's, their own) run
through Keras's own :class:`keras.callbacks.CallbackList`, so they get Keras's contract:
``set_model`` / ``set_params``, every ``on_*`` method in Keras's order, logs as Python floats
under Keras's names, ``model.stop_training`` honoured. The list is driven from one plugin on the
bus, beside corebus plugins; batch hooks are implemented only when some callback overrides a
batch method, so a run of epoch-level callbacks pays nothing per step.
"""

from __future__ import annotations

from typing import Any

import keras

from corebus.bus.bus import hookimpl
from corebus.errors import ConfigError

#: Keras callbacks that write ``model.optimizer.learning_rate`` themselves: corebus's LR
#: plugins own the same value, so a run may have one writer or the other.
_LR_WRITERS = (keras.callbacks.LearningRateScheduler, keras.callbacks.ReduceLROnPlateau)


def _overrides(callbacks: list[Any], method: str) -> bool:
    base = getattr(keras.callbacks.Callback, method)
    return any(getattr(type(cb), method, base) is not base for cb in callbacks)


def _py_logs(logs: Any) -> dict[str, Any]:
    """Keras's own conversion (floats; arrays stay arrays), from a mapping that may be lazy."""
    from keras.src.utils import python_utils

    return python_utils.pythonify_logs(dict(logs) if logs is not None else {})


class KerasCallbacks:
    """Runs a list of Keras callbacks as one corebus plugin (see the module docstring)."""

    error_policy = "propagate"  # a callback's exception reaches the caller as it would from model.fit

    def __init__(self, callbacks: Any, model: Any):
        callbacks = list(keras.tree.flatten(callbacks)) if callbacks is not None else []
        for cb in callbacks:
            if isinstance(cb, type):
                raise ConfigError(f"callbacks=[{cb.__name__}]: pass an instance ({cb.__name__}(...)), not the class")
            if not isinstance(cb, keras.callbacks.Callback):
                raise ConfigError(
                    f"callbacks=[...] takes keras.callbacks.Callback objects, got {type(cb).__name__}; "
                    "pass corebus plugins as plugins=[...]"
                )
        self.callbacks = callbacks
        self.model = model
        self.list = keras.callbacks.CallbackList(callbacks, add_history=False, add_progbar=False, model=model)
        if any(isinstance(cb, _LR_WRITERS) for cb in callbacks):
            # two owners of one LR would overwrite each other: the bus refuses the pair
            self.controls = {"lr.schedule", "lr.multiplier"}

    def __repr__(self) -> str:
        return f"KerasCallbacks([{', '.join(type(cb).__name__ for cb in self.callbacks)}])"

    @classmethod
    def of(cls, callbacks: Any, model: Any) -> "KerasCallbacks":
        """The plugin for ``callbacks``, with batch hooks only where some callback has them."""
        plain = cls(callbacks, model)
        wanted = {
            hook: function
            for hook, (methods, function) in _BATCH_HOOKS.items()
            if any(_overrides(plain.callbacks, m) for m in methods)
        }
        if not wanted:
            return plain
        kind = type(cls.__name__, (cls,), wanted)
        instance = kind.__new__(kind)
        instance.__dict__.update(plain.__dict__)
        return instance

    # The engine's stop flag and Keras's (model.stop_training) agree after every call.
    def _sync_stop(self, trainer: Any) -> None:
        if getattr(self.model, "stop_training", False):
            trainer.stop_training = True

    def set_params(self, params: dict[str, Any]) -> None:
        self.list.set_params({k: params[k] for k in ("verbose", "epochs", "steps") if k in params})

    _training = False

    @hookimpl
    def on_train_begin(self, trainer, logs):
        self._training = True
        self.model.stop_training = False
        self.set_params(trainer.params)
        self.list.on_train_begin(_py_logs(logs))
        self._sync_stop(trainer)

    @hookimpl
    def on_epoch_begin(self, trainer, epoch, logs):
        self.list.on_epoch_begin(epoch, _py_logs(logs))
        self._sync_stop(trainer)

    @hookimpl
    def on_epoch_end(self, trainer, epoch, logs):
        py_logs = _py_logs(logs)
        # One dict shared by the callbacks, as CallbackList hands them (it would copy ours).
        for callback in self.list.callbacks:
            callback.on_epoch_end(epoch, py_logs)
        # What a callback adds (ReduceLROnPlateau's "learning_rate") reaches History, as in Keras.
        if isinstance(logs, dict):
            for key, value in py_logs.items():
                if key not in logs:
                    logs[key] = value
        self._sync_stop(trainer)

    @hookimpl
    def on_train_end(self, trainer, logs):
        self._training = False
        self.list.on_train_end(_py_logs(logs))

    @hookimpl
    def on_exception(self, trainer, exception):
        self._training = False

    @hookimpl
    def on_test_begin(self, trainer, logs):
        if not self._training:  # evaluate(): its own params; inside fit, fit's (as in Keras)
            self.set_params(trainer.params)
        self.list.on_test_begin(_py_logs(logs))

    @hookimpl
    def on_test_end(self, trainer, logs):
        self.list.on_test_end(_py_logs(logs))

    @hookimpl
    def on_predict_begin(self, trainer, logs):
        self.set_params(trainer.params)
        self.list.on_predict_begin(_py_logs(logs))

    @hookimpl
    def on_predict_end(self, trainer, logs):
        self.list.on_predict_end(_py_logs(logs))


def _train_batch_begin(self, trainer, batch, logs):
    self.list.on_train_batch_begin(batch, _py_logs(logs))
    self._sync_stop(trainer)


def _train_batch_end(self, trainer, batch, logs):
    self.list.on_train_batch_end(batch, _py_logs(logs))
    self._sync_stop(trainer)


def _test_batch_begin(self, batch, logs):
    self.list.on_test_batch_begin(batch, _py_logs(logs))


def _test_batch_end(self, batch, logs):
    self.list.on_test_batch_end(batch, _py_logs(logs))


def _predict_batch_begin(self, batch, logs):
    self.list.on_predict_batch_begin(batch, _py_logs(logs))


def _predict_batch_end(self, batch, logs):
    self.list.on_predict_batch_end(batch, _py_logs(logs))


#: hook -> (the Keras methods that make it needed, its implementation)
_BATCH_HOOKS = {
    "on_train_batch_begin": (("on_train_batch_begin", "on_batch_begin"), hookimpl(_train_batch_begin)),
    "on_train_batch_end": (("on_train_batch_end", "on_batch_end"), hookimpl(_train_batch_end)),
    "on_test_batch_begin": (("on_test_batch_begin",), hookimpl(_test_batch_begin)),
    "on_test_batch_end": (("on_test_batch_end",), hookimpl(_test_batch_end)),
    "on_predict_batch_begin": (("on_predict_batch_begin",), hookimpl(_predict_batch_begin)),
    "on_predict_batch_end": (("on_predict_batch_end",), hookimpl(_predict_batch_end)),
}

__all__ = ["KerasCallbacks"]
