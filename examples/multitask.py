"""Multi-task learning: one network, two heads, a weighted sum of their losses.

From each 8x8 digit image (scikit-learn's bundled digits, no download) the model predicts the
digit (a classification head) and how much ink the image holds (a regression head: the mean
pixel value, standardised). The custom step weights the two losses and reports each one, so
early stopping, checkpoints, TensorBoard and MLflow see ``digit_loss`` and ``ink_loss`` as
well as their weighted sum ``loss``::

    python examples/multitask.py --epochs 20 --ink-weight 0.5
    tensorboard --logdir corebus-runs/multitask/tensorboard
    mlflow ui --backend-store-uri sqlite:///corebus-runs/multitask/mlflow.db
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus.demo import load_digits_split  # noqa: E402


def targets(x: np.ndarray, y: np.ndarray, ink_mean: float, ink_std: float) -> dict[str, np.ndarray]:
    """Both heads' targets: the digit, and the image's mean pixel value (standardised)."""
    ink = (x.mean(axis=1, keepdims=True) - ink_mean) / ink_std
    return {"digit": y, "ink": ink.astype("float32")}


class TwoHeads(keras.Model):
    """A shared trunk, a ``digit`` head (10 logits) and an ``ink`` head (one number)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.trunk = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(hidden, activation="relu"),
            ],
            name="trunk",
        )
        self.digit_head = keras.layers.Dense(10, name="digit")
        self.ink_head = keras.layers.Dense(1, name="ink")
        # Running means over the epoch (corebus resets a model's metrics at each epoch and
        # before validation, as Keras does).
        self.trackers = [keras.metrics.Mean(name=n) for n in ("loss", "digit_loss", "ink_loss")]
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="digit_accuracy")

    def call(self, x, training=False):
        features = self.trunk(x, training=training)
        return {"digit": self.digit_head(features), "ink": self.ink_head(features)}


def make_steps(model: TwoHeads, digit_weight: float, ink_weight: float):
    """The custom train and test steps: one weighted loss, per-head losses reported."""
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    squared_error = keras.losses.MeanSquaredError()

    def losses(x, y, training):
        out = model(x, training=training)
        digit_loss = cross_entropy(y["digit"], out["digit"])
        ink_loss = squared_error(y["ink"], out["ink"])
        return digit_weight * digit_loss + ink_weight * ink_loss, digit_loss, ink_loss, out

    def report(y, values, out):
        for tracker, value in zip(model.trackers, values):
            tracker.update_state(value)
        model.accuracy.update_state(y["digit"], out["digit"])
        return {m.name: m.result() for m in [*model.trackers, model.accuracy]}

    def train_step(trainer, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, digit_loss, ink_loss, out = losses(x, y, training=True)
        # One optimizer ("default"): the gradient pipeline (clipping) runs before it applies.
        trainer.apply_gradients(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return report(y, (loss, digit_loss, ink_loss), out)

    def test_step(trainer, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        loss, digit_loss, ink_loss, out = losses(x, y, training=False)
        return report(y, (loss, digit_loss, ink_loss), out)

    return train_step, test_step


def plugins(run_dir: Path, total_steps: int, warmup_steps: int, patience: int, clip: float) -> list[Any]:
    """The plugin stack, by entry-point name, as a config file would list it."""
    return [
        {"name": "gradient_clipping", "global_norm": clip, "log_norm": True},
        {
            "name": "lr_schedule",
            "schedule": "cosine",
            "initial_learning_rate": 3e-3,
            "decay_steps": total_steps,
            "alpha": 0.05,
            "warmup_steps": warmup_steps,
        },
        {"name": "early_stopping", "monitor": "val_loss", "patience": patience, "restore_best_weights": True},
        {
            "name": "checkpoint",
            "filepath": str(run_dir / "checkpoints" / "epoch{epoch:02d}-{val_loss:.4f}.weights.h5"),
            "monitor": "val_loss",
            "save_weights_only": True,
            "save_top_k": 2,
            "save_last": True,
        },
        {"name": "tensorboard", "log_dir": str(run_dir / "tensorboard"), "update_freq": 10},
        {
            "name": "mlflow",
            "tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}",
            "experiment_name": "corebus-examples",
            "run_name": "multitask",
            "dir": str(run_dir / "mlflow"),
            "log_every_n_steps": 10,
        },
    ]


def main(argv: list[str] | None = None) -> corebus.Trainer:
    """Train from the command line (``argv``: the arguments, default ``sys.argv[1:]``); returns
    the trainer, whose ``history``, ``bus.plugins`` and ``model`` tell how the run went."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--steps-per-epoch", type=int, default=None, help="batches per epoch (default: the whole training set once)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--digit-weight", type=float, default=1.0, help="weight of the classification loss")
    parser.add_argument("--ink-weight", type=float, default=0.5, help="weight of the regression loss")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--patience", type=int, default=4, help="early stopping patience (epochs)")
    parser.add_argument("--clip", type=float, default=1.0, help="global norm the gradients are clipped to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("corebus-runs") / "multitask", help="run directory")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    run_dir = args.out.resolve()
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_val, y_val) = load_digits_split(seed=args.seed)
    ink = x_train.mean(axis=1)  # standardised with the training set's statistics only
    y_train = targets(x_train, y_train, ink.mean(), ink.std())
    y_val = targets(x_val, y_val, ink.mean(), ink.std())

    model = TwoHeads(hidden=args.hidden)
    model(x_train[:1])  # builds it: Keras refuses to save the weights of a model never called
    train_step, test_step = make_steps(model, args.digit_weight, args.ink_weight)
    steps = args.steps_per_epoch or math.ceil(len(x_train) / args.batch_size)
    trainer = corebus.Trainer(
        model,
        optimizer=keras.optimizers.Adam(3e-3),
        train_step=train_step,
        test_step=test_step,
        plugins=plugins(run_dir, args.epochs * steps, warmup_steps=steps, patience=args.patience, clip=args.clip),
        seed=args.seed,
    )
    history = trainer.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        validation_data=(x_val, y_val),
        verbose=args.verbose,
    )
    if args.verbose:
        last = {k: round(v[-1], 4) for k, v in history.history.items()}
        print(f"\nlast epoch: {last}\nrun directory: {run_dir}")
        print(f"  tensorboard --logdir {run_dir / 'tensorboard'}")
        print(f"  mlflow ui --backend-store-uri sqlite:///{run_dir / 'mlflow.db'}")
    return trainer


if __name__ == "__main__":
    main()
