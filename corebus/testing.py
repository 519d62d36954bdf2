"""Helpers and pytest fixtures for testing corebus plugins (yours and ours).

Installed as a pytest plugin (``pytest11`` entry point), so a plugin package's tests get the
fixtures ``tiny_data``, ``tiny_model``, ``recorder`` and ``make_trainer`` without importing
anything. TensorFlow is imported only when a fixture needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from corebus.bus.bus import hookimpl


def tiny_data(n: int = 96, features: int = 4, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable classification problem: the label is the argmax of a fixed projection."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    projection = rng.normal(size=(features, classes)).astype("float32")
    y = np.argmax(x @ projection, axis=1).astype("int32")
    return x, y


def tiny_model(features: int = 4, classes: int = 3, seed: int = 0, hidden: int = 8) -> Any:
    """A small seeded MLP (same seed, same initial weights)."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


def tiny_gan(noise_dim: int = 4, data_dim: int = 2, seed: int = 0) -> Any:
    """A two-network model for custom-step tests: ``.generator`` and ``.discriminator``."""
    import keras

    keras.utils.set_random_seed(seed)

    class TinyGAN(keras.Model):
        def __init__(self):
            super().__init__()
            self.generator = keras.Sequential([keras.Input((noise_dim,)), keras.layers.Dense(data_dim)])
            self.discriminator = keras.Sequential([keras.Input((data_dim,)), keras.layers.Dense(1)])

        def call(self, z):
            return self.discriminator(self.generator(z))

    return TinyGAN()


class RecordingPlugin:
    """Records every hook call as a tuple, for comparing event sequences.

    ``read_logs=False`` records only the log *names*, so the recorder itself forces no sync.
    """

    def __init__(self, read_logs: bool = False):
        self.read_logs = read_logs
        self.events: list[tuple] = []

    def _logs(self, logs: Any) -> Any:
        if logs is None:
            return None
        if self.read_logs:
            return {k: round(float(v), 5) for k, v in dict(logs).items()}
        return tuple(sorted(logs))

    def names(self) -> list[str]:
        return [event[0] for event in self.events]

    @hookimpl
    def on_train_begin(self, trainer):
        self.events.append(("on_train_begin", trainer.global_step))

    @hookimpl
    def on_train_end(self, trainer, logs):
        self.events.append(("on_train_end", trainer.global_step, self._logs(logs)))

    @hookimpl
    def on_epoch_begin(self, epoch):
        self.events.append(("on_epoch_begin", epoch))

    @hookimpl
    def on_epoch_end(self, trainer, epoch, logs):
        self.events.append(("on_epoch_end", epoch, trainer.global_step, self._logs(logs)))

    @hookimpl
    def on_train_batch_begin(self, trainer, batch):
        self.events.append(("on_train_batch_begin", batch, trainer.global_step))

    @hookimpl
    def on_train_batch_end(self, trainer, batch, logs):
        self.events.append(("on_train_batch_end", batch, trainer.global_step, self._logs(logs)))

    @hookimpl
    def on_test_begin(self):
        self.events.append(("on_test_begin",))

    @hookimpl
    def on_test_end(self, logs):
        self.events.append(("on_test_end", self._logs(logs)))

    @hookimpl
    def on_test_batch_begin(self, batch):
        self.events.append(("on_test_batch_begin", batch))

    @hookimpl
    def on_test_batch_end(self, batch, logs):
        self.events.append(("on_test_batch_end", batch, self._logs(logs)))

    @hookimpl
    def on_predict_begin(self):
        self.events.append(("on_predict_begin",))

    @hookimpl
    def on_predict_end(self):
        self.events.append(("on_predict_end",))

    @hookimpl
    def on_predict_batch_begin(self, batch):
        self.events.append(("on_predict_batch_begin", batch))

    @hookimpl
    def on_predict_batch_end(self, batch, logs):
        self.events.append(("on_predict_batch_end", batch))

    @hookimpl
    def on_log(self, kind, step, logs):
        self.events.append(("on_log", kind, step, self._logs(logs)))


def make_trainer(plugins: Sequence[Any] = (), model: Any = None, **kwargs: Any) -> Any:
    """A :class:`corebus.Trainer` on :func:`tiny_model` with SGD and accuracy, unless overridden."""
    from corebus.engine.trainer import Trainer

    kwargs.setdefault("optimizer", "sgd")
    kwargs.setdefault("loss", "sparse_categorical_crossentropy")
    kwargs.setdefault("metrics", ["accuracy"])
    kwargs.setdefault("seed", 0)
    return Trainer(model if model is not None else tiny_model(), plugins=list(plugins), **kwargs)


def fit_both_ways(
    plugin_factory: Callable[[], Sequence[Any]],
    x: Any,
    y: Any,
    *,
    optimizer: str = "sgd",
    **fit_kwargs: Any,
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Run fresh plugins from ``plugin_factory`` in ``Trainer.fit`` and in ``model.fit``.

    Same seed, same model, no shuffling. Returns ``((engine_plugins, history),
    (keras_plugins, history))`` so a test can compare what the plugins saw.
    """
    from corebus.keras_adapter import KerasCallback

    fit_kwargs.setdefault("verbose", 0)
    fit_kwargs.setdefault("shuffle", False)
    engine_plugins = list(plugin_factory())
    trainer = make_trainer(engine_plugins, optimizer=optimizer)
    engine_history = trainer.fit(x, y, **fit_kwargs)

    keras_plugins = list(plugin_factory())
    model = tiny_model()
    callback = KerasCallback(keras_plugins)
    model.compile(
        optimizer=callback.wrap_optimizer(optimizer),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    keras_history = model.fit(x, y, callbacks=[callback], **fit_kwargs)
    return (engine_plugins, engine_history), (keras_plugins, keras_history)


# ---------------------------------------------------------------------- pytest fixtures


@pytest.fixture(name="tiny_data")
def _tiny_data_fixture() -> tuple[np.ndarray, np.ndarray]:
    return tiny_data()


@pytest.fixture(name="tiny_model")
def _tiny_model_fixture() -> Any:
    return tiny_model()


@pytest.fixture(name="recorder")
def _recorder_fixture() -> RecordingPlugin:
    return RecordingPlugin()


@pytest.fixture(name="make_trainer")
def _make_trainer_fixture() -> Callable[..., Any]:
    return make_trainer
