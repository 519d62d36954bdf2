"""keras.io's "Customizing what happens in fit() (TensorFlow)", as corebus code.

The guide keeps ``fit`` and overrides the model's ``train_step`` (and ``test_step``). corebus
runs a model class's own steps: ``corebus.Trainer(model).fit(...)`` is ``model.fit(...)`` with
the step the class defines. Two models of the guide, on sklearn's 8x8 digits (no download):

* ``CompiledStep``: ``train_step`` / ``test_step`` that use what ``compile`` set up
  (``compute_loss``, ``compute_metrics``, ``self.optimizer``), with sample weights;
* ``OwnMetrics``: the lower-level variant: ``compile(optimizer=...)`` only, its loss written by
  hand and its own metric trackers, listed in ``metrics`` so that they are reset every epoch.

Each is trained twice from the same initial weights, by ``corebus.Trainer(model).fit`` and by
``model.fit`` (no shuffling), then evaluated both ways; the histories, the weights and the
evaluations agree::

    python examples/keras_io_custom_fit.py --quick
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus.demo import load_digits_split  # noqa: E402


class CompiledStep(keras.Model):
    """The guide's first model: its own steps on top of what ``compile`` set up."""

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred, sample_weight=sample_weight)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._report(x, y, y_pred, sample_weight, loss)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        loss = self.compute_loss(y=y, y_pred=y_pred, sample_weight=sample_weight)
        return self._report(x, y, y_pred, sample_weight, loss)

    def _report(self, x, y, y_pred, sample_weight, loss):
        for metric in self.metrics:  # compute_loss does not track the loss: the step does, as in the guide
            if metric.name == "loss":
                metric.update_state(loss)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)  # the compiled metrics, and loss


class OwnMetrics(keras.Model):
    """The guide's lower-level model: compiled with an optimizer only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @property
    def metrics(self):
        # Listed here, they are reset at the start of every epoch and of every evaluation, by
        # model.fit and by corebus alike.
        return [self.loss_tracker, self.accuracy_tracker]

    def _report(self, y, logits, loss):
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(y, logits)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy_tracker.result()}

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            loss = self.cross_entropy(y, logits)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return self._report(y, logits, loss)

    def test_step(self, data):
        x, y = data
        logits = self(x, training=False)
        return self._report(y, logits, self.cross_entropy(y, logits))


def build(kind: type, seed: int, hidden: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,))
    x = keras.layers.Dense(hidden, activation="relu")(inputs)
    model = kind(inputs, keras.layers.Dense(10)(x))  # logits
    if kind is CompiledStep:
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
    else:
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def train(kind: type, by: str, data, args) -> dict:
    """One model of ``kind`` trained ``by`` "corebus" or "fit"; its history, weights and evaluation."""
    (x_train, y_train), (x_val, y_val) = data
    model = build(kind, args.seed, args.hidden)
    fit_args = dict(
        batch_size=args.batch_size, epochs=args.epochs, shuffle=False, validation_data=(x_val, y_val), verbose=0
    )
    if kind is CompiledStep:  # the guide's sample-weight case: odd digits count twice
        fit_args["sample_weight"] = np.where(y_train % 2 == 1, 2.0, 1.0).astype("float32")
    if by == "corebus":
        trainer = corebus.Trainer(model)  # the optimizer, loss and metrics of compile; the class's steps
        history = trainer.fit(x_train, y_train, **fit_args)
        evaluation = trainer.evaluate(x_val, y_val, batch_size=args.batch_size, verbose=0, return_dict=True)
    else:
        history = model.fit(x_train, y_train, **fit_args)
        evaluation = model.evaluate(x_val, y_val, batch_size=args.batch_size, verbose=0, return_dict=True)
    return {"history": history.history, "weights": model.get_weights(), "evaluation": evaluation}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 3
    data = load_digits_split(seed=args.seed)
    results = {}
    for kind in (CompiledStep, OwnMetrics):
        runs = {by: train(kind, by, data, args) for by in ("corebus", "fit")}
        difference = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(runs["corebus"]["weights"], runs["fit"]["weights"], strict=True)
        )
        results[kind.__name__] = {**runs, "max_difference": difference}
        for by in ("corebus", "fit"):
            history = runs[by]["history"]
            print(
                f"{kind.__name__:12s} {by:7s} val_accuracy by epoch: "
                f"{' '.join(f'{v:.4f}' for v in history['val_accuracy'])}; "
                f"evaluate: loss {runs[by]['evaluation']['loss']:.4f} accuracy {runs[by]['evaluation']['accuracy']:.4f}"
            )
        print(f"{kind.__name__:12s} largest weight difference, corebus vs model.fit: {difference:.2e}")
    return results


if __name__ == "__main__":
    main()
