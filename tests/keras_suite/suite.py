"""One run, four ways: Keras's callback in ``model.fit`` (the oracle), the same Keras callback in
``corebus.Trainer.fit(callbacks=)``, and the corebus plugin of the same name through the adapter
and in the engine. Tiny seeded models, no shuffling, so the four runs see the same batches."""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np

import corebus
from corebus.testing import tiny_data, tiny_model

WAYS = ("keras_in_trainer", "adapter", "engine")


class Run:
    """What a test compares: the History, the final weights, the callback or plugin object."""

    def __init__(self, history: Any, model: Any, obj: Any, error: BaseException | None = None):
        self.history, self.model, self.obj, self.error = history, model, obj, error

    @property
    def epochs(self) -> list[int]:
        return list(self.history.epoch)

    def weights(self) -> list[np.ndarray]:
        return self.model.get_weights()


def compiled(
    lr: float = 0.01,
    loss: str = "sparse_categorical_crossentropy",
    metrics=("accuracy",),
    model: Any = None,
    optimizer: Any = None,
) -> Any:
    model = model if model is not None else tiny_model()
    model.compile(
        optimizer=optimizer if optimizer is not None else keras.optimizers.SGD(lr), loss=loss, metrics=list(metrics)
    )
    return model


def run(
    way: str,
    make: Callable[[], Any],
    *,
    x=None,
    y=None,
    model_fn: Callable[[], Any] = compiled,
    raises: type[BaseException] | tuple = (),
    extra: Callable[[], list] = list,
    **fit: Any,
) -> Run:
    """Fit once ``way``; ``make`` builds the Keras callback (keras ways) or the plugin (others)."""
    if x is None:
        x, y = tiny_data(n=48)
    fit = {"batch_size": 16, "epochs": 4, "shuffle": False, "verbose": 0, **fit}
    model = model_fn()
    obj = make()
    history = error = None
    try:
        if way == "keras":
            history = model.fit(x, y, callbacks=[*extra(), obj], **fit)
        elif way == "keras_in_trainer":
            history = corebus.Trainer(model).fit(x, y, callbacks=[*extra(), obj], **fit)
        elif way == "adapter":
            history = model.fit(x, y, callbacks=[*extra(), corebus.KerasCallback([obj])], **fit)
        elif way == "engine":
            history = corebus.Trainer(model, plugins=[obj]).fit(x, y, callbacks=extra() or None, **fit)
        else:
            raise ValueError(way)
    except raises as exc:  # noqa: PERF203 - the test decides what is expected
        error = exc
    return Run(history, model, obj, error)


def four(make_keras: Callable[[], Any], make_plugin: Callable[[], Any], **kwargs: Any) -> dict[str, Run]:
    """The oracle run and the three others, keyed by way."""
    runs = {"keras": run("keras", make_keras, **kwargs)}
    runs["keras_in_trainer"] = run("keras_in_trainer", make_keras, **kwargs)
    runs["adapter"] = run("adapter", make_plugin, **kwargs)
    runs["engine"] = run("engine", make_plugin, **kwargs)
    return runs


def same_weights(a: Run, b: Run, rtol: float = 1e-4) -> None:
    for left, right in zip(a.weights(), b.weights(), strict=True):
        np.testing.assert_allclose(left, right, rtol=rtol, atol=1e-6)


ALL_WAYS = ("keras", *WAYS)


def fit_with(
    way: str, model: Any, x: Any, y: Any = None, *, callbacks: Any = (), plugins: Any = (), extra: Any = (), **fit: Any
) -> Any:
    """One ``fit`` of ``model`` ``way``: the keras ways get ``callbacks`` (Keras callbacks), the
    adapter and the engine get ``plugins`` (corebus plugins); ``extra`` Keras callbacks (spies,
    interrupters) go to every way, after the others."""
    fit = {"verbose": 0, "shuffle": False, **fit}
    if way == "keras":
        return model.fit(x, y, callbacks=[*callbacks, *extra], **fit)
    if way == "keras_in_trainer":
        return corebus.Trainer(model).fit(x, y, callbacks=[*callbacks, *extra], **fit)
    if way == "adapter":
        return model.fit(x, y, callbacks=[corebus.KerasCallback(list(plugins)), *extra], **fit)
    if way == "engine":
        return corebus.Trainer(model, plugins=list(plugins)).fit(x, y, callbacks=list(extra) or None, **fit)
    raise ValueError(way)


def files_in(directory: Any) -> list[str]:
    """The files a run left in ``directory`` (relative paths), without corebus's run-lock files."""
    from pathlib import Path

    root = Path(directory)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
