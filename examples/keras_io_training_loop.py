"""keras.io's "Writing a training loop from scratch (TensorFlow)", as corebus code.

The guide trains a digit classifier with a hand-written loop: for each epoch, for each batch,
a ``GradientTape``, the loss (plus the losses the layers add, such as an activity
regularizer), ``optimizer.apply``, a training accuracy metric, then a validation loop, the
step compiled with ``tf.function``. Here the same program is written three ways on the same
data and initial weights (no shuffling, so they see the same batches):

* ``loop``: the hand-written loop, as the guide writes it (the "before");
* ``corebus``: the same step as ``train_step(trainer, data)`` / ``test_step``, and
  ``corebus.Trainer`` runs the loop: compiled steps, validation, History, plugins (the "after");
* ``fit``: the same model compiled and trained by ``model.fit``, the reference.

All three end with the same weights and the same validation accuracy (sklearn's 8x8 digits,
no download)::

    python examples/keras_io_training_loop.py --quick
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


def make_model(seed: int, hidden: int) -> keras.Model:
    """The guide's MLP (returns logits), with an activity regularizer that adds a layer loss."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name="digits")
    x = keras.layers.Dense(hidden, activation="relu")(inputs)
    x = keras.layers.ActivityRegularization(l2=1e-3)(x)  # what model.losses carries
    x = keras.layers.Dense(hidden, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="predictions")(x))


def loss_fn() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def optimizer(lr: float) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(learning_rate=lr)


def train_by_hand(model, data, args) -> dict[str, list[float]]:
    """The guide's program: a loop of compiled steps, metrics reset at each epoch."""
    (x_train, y_train), (x_val, y_val) = data
    opt, loss_of = optimizer(args.lr), loss_fn()
    train_acc = keras.metrics.SparseCategoricalAccuracy()
    val_acc = keras.metrics.SparseCategoricalAccuracy()
    train_set = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(args.batch_size)
    val_set = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(args.batch_size)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_of(y, logits) + sum(model.losses)  # the layers' own losses
        gradients = tape.gradient(loss, model.trainable_weights)
        opt.apply(gradients, model.trainable_weights)
        train_acc.update_state(y, logits)
        return loss

    @tf.function
    def test_step(x, y):
        val_acc.update_state(y, model(x, training=False))

    history: dict[str, list[float]] = {"accuracy": [], "val_accuracy": []}
    for _epoch in range(args.epochs):
        for x, y in train_set:
            train_step(x, y)
        for x, y in val_set:
            test_step(x, y)
        history["accuracy"].append(float(train_acc.result()))
        history["val_accuracy"].append(float(val_acc.result()))
        train_acc.reset_state()
        val_acc.reset_state()
    return history


class Digits(keras.Model):
    """The same model as one object holding the running metrics the steps report: corebus resets
    a model's metrics at each epoch and before each validation pass (the guide's reset_state)."""

    def __init__(self, seed: int, hidden: int):
        super().__init__()
        self.net = make_model(seed, hidden)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, x, training=False):
        return self.net(x, training=training)


def corebus_steps(model: Digits):
    """The guide's two step functions, for ``corebus.Trainer(train_step=..., test_step=...)``."""
    loss_of = loss_fn()

    def train_step(trainer, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_of(y, logits) + sum(model.losses)
        # the gradient pipeline (clipping, accumulation, if a plugin asks), then the optimizer
        trainer.apply_gradients(tape.gradient(loss, model.trainable_weights), model.trainable_weights)
        return report(x, y, logits, loss)

    def test_step(trainer, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = model(x, training=False)
        return report(x, y, logits, loss_of(y, logits) + sum(model.losses))

    def report(x, y, logits, loss):
        # weighted by the batch's rows, so the epoch's loss is the mean over samples (as fit's)
        model.loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])
        model.accuracy.update_state(y, logits)
        return {"loss": model.loss_tracker.result(), "accuracy": model.accuracy.result()}

    return train_step, test_step


def train_with_corebus(data, args) -> tuple[keras.Model, dict[str, list[float]]]:
    (x_train, y_train), (x_val, y_val) = data
    model = Digits(args.seed, args.hidden)
    train_step, test_step = corebus_steps(model)
    trainer = corebus.Trainer(model, optimizer=optimizer(args.lr), train_step=train_step, test_step=test_step)
    history = trainer.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        shuffle=False,
        validation_data=(x_val, y_val),
        verbose=0,
    )
    return model.net, history.history


def train_with_fit(data, args) -> tuple[keras.Model, dict[str, list[float]]]:
    (x_train, y_train), (x_val, y_val) = data
    model = make_model(args.seed, args.hidden)
    model.compile(optimizer=optimizer(args.lr), loss=loss_fn(), metrics=["accuracy"])  # adds model.losses itself
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        shuffle=False,
        validation_data=(x_val, y_val),
        verbose=0,
    )
    return model, history.history


def max_difference(a: keras.Model, b: keras.Model) -> float:
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a.get_weights(), b.get_weights(), strict=True))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs (for tests)")
    args = parser.parse_args(argv)
    data = load_digits_split(seed=args.seed)
    if args.quick:
        args.epochs = 3

    by_hand = make_model(args.seed, args.hidden)
    loop_history = train_by_hand(by_hand, data, args)
    ours, corebus_history = train_with_corebus(data, args)
    reference, fit_history = train_with_fit(data, args)
    results = {
        "loop": loop_history,
        "corebus": corebus_history,
        "fit": fit_history,
        "weights": {"loop": by_hand.get_weights(), "corebus": ours.get_weights(), "fit": reference.get_weights()},
        "max_difference": {"loop": max_difference(by_hand, reference), "corebus": max_difference(ours, reference)},
    }
    for name in ("loop", "corebus", "fit"):
        print(f"{name:8s} val_accuracy by epoch: {' '.join(f'{v:.4f}' for v in results[name]['val_accuracy'])}")
    print(
        f"largest weight difference from model.fit: loop {results['max_difference']['loop']:.2e}, "
        f"corebus {results['max_difference']['corebus']:.2e}"
    )
    return results


if __name__ == "__main__":
    main()
