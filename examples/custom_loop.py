"""A custom training loop with validation: your ``train_step`` and ``test_step``, corebus's loop.

The classic TensorFlow custom loop (``for epoch: for batch: GradientTape ...; then a validation
loop``) is two functions here: ``train_step(trainer, data)`` and ``test_step(trainer, data)``,
each returning the running metrics. ``corebus.Trainer`` compiles them, iterates the data,
runs the validation pass on ``validation_data`` at every epoch end (its metrics reach the
plugins and the History as ``val_*``), and drives the plugins: here early stopping on
``val_loss``, restoring the best weights::

    python examples/custom_loop.py --epochs 20 --label-smoothing 0.1
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus.demo import load_digits_split  # noqa: E402


class Classifier(keras.Model):
    """An MLP that returns logits, with the running metrics the steps report."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.body = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dropout(0.1),
                keras.layers.Dense(10),
            ]
        )
        # corebus resets a model's metrics at each epoch and before each validation pass.
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, x, training=False):
        return self.body(x, training=training)


def make_steps(model: Classifier, label_smoothing: float):
    """The two steps of the loop; both are traced into compiled functions by corebus."""
    train_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)
    test_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # plain cross-entropy

    def report(x, y, loss, logits):
        # Weighted by the batch size, so the epoch value is the mean over samples even when
        # the last batch is smaller.
        model.loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])
        model.accuracy.update_state(y, logits)
        return {"loss": model.loss_tracker.result(), "accuracy": model.accuracy.result()}

    def train_step(trainer, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = train_loss(tf.one_hot(y, 10), logits)
        # the gradient pipeline (clipping, accumulation, if any plugin asks), then the optimizer
        trainer.apply_gradients(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return report(x, y, loss, logits)

    def test_step(trainer, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = model(x, training=False)
        return report(x, y, test_loss(y, logits), logits)

    return train_step, test_step


def main(argv: list[str] | None = None) -> corebus.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--patience", type=int, default=3, help="early stopping patience (epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("corebus-runs") / "custom_loop", help="run directory")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_val, y_val) = load_digits_split(seed=args.seed)
    model = Classifier(hidden=args.hidden)
    model(x_train[:1])  # build it
    train_step, test_step = make_steps(model, args.label_smoothing)
    trainer = corebus.Trainer(
        model,
        optimizer=keras.optimizers.Adam(1e-3),
        train_step=train_step,
        test_step=test_step,
        plugins=[
            {"name": "early_stopping", "monitor": "val_loss", "patience": args.patience, "restore_best_weights": True},
            {"name": "csv_logger", "filename": str(args.out.resolve() / "history.csv")},
        ],
        seed=args.seed,
    )
    history = trainer.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_val, y_val),
        verbose=args.verbose,
    )
    if args.verbose:
        best = min(range(len(history.epoch)), key=lambda e: history.history["val_loss"][e])
        print(
            f"best epoch {best + 1}: val_loss {history.history['val_loss'][best]:.4f}, "
            f"val_accuracy {history.history['val_accuracy'][best]:.4f} (weights restored)"
        )
        print(f"epoch log: {args.out.resolve() / 'history.csv'}")
    return trainer


if __name__ == "__main__":
    main()
