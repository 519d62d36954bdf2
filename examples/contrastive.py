"""A Siamese network on pairs of digits, trained with the contrastive loss.

Each example is a pair of 8x8 digit images (scikit-learn's bundled digits, no download),
``{"anchor": ..., "other": ...}``, labelled 1 when both show the same digit and 0 otherwise.
One shared encoder embeds both images; the contrastive loss (Hadsell, Chopra & LeCun, 2006)
pulls same-digit pairs together and pushes different ones at least ``margin`` apart::

    loss = y * d**2 + (1 - y) * max(margin - d, 0)**2,   d = |f(anchor) - f(other)|

The step also reports the share of pairs on the right side of ``margin / 2``::

    python examples/contrastive.py --epochs 20
    tensorboard --logdir corebus-runs/contrastive/tensorboard
    mlflow ui --backend-store-uri sqlite:///corebus-runs/contrastive/mlflow.db
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


def make_pairs(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One pair per image: half with an image of the same digit, half with another digit."""
    rng = np.random.default_rng(seed)
    by_digit = {d: np.flatnonzero(y == d) for d in np.unique(y)}
    same = rng.random(len(x)) < 0.5
    others = np.empty(len(x), dtype=int)
    for i, digit in enumerate(y):
        if same[i]:
            others[i] = rng.choice(by_digit[digit])
        else:
            other_digit = rng.choice([d for d in by_digit if d != digit])
            others[i] = rng.choice(by_digit[other_digit])
    return {"anchor": x, "other": x[others]}, same.astype("float32")


class Siamese(keras.Model):
    """One encoder applied to both images; the output is their embedding distance."""

    def __init__(self, hidden: int = 64, embedding: int = 16):
        super().__init__()
        self.encoder = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(embedding),
            ],
            name="encoder",
        )
        # Running means over the epoch (corebus resets a model's metrics at each epoch and
        # before validation, as Keras does).
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.pair_accuracy = keras.metrics.Mean(name="pair_accuracy")
        self.same_distance = keras.metrics.Mean(name="same_distance")
        self.different_distance = keras.metrics.Mean(name="different_distance")

    def call(self, pairs, training=False):
        a = self.encoder(pairs["anchor"], training=training)
        b = self.encoder(pairs["other"], training=training)
        # epsilon: the gradient of sqrt at 0 is infinite (identical images)
        return tf.sqrt(tf.reduce_sum(tf.square(a - b), axis=-1) + 1e-9)


def contrastive_loss(same: tf.Tensor, distance: tf.Tensor, margin: float) -> tf.Tensor:
    same = tf.cast(same, distance.dtype)
    return tf.reduce_mean(same * tf.square(distance) + (1.0 - same) * tf.square(tf.nn.relu(margin - distance)))


def make_steps(model: Siamese, margin: float):
    """The custom train and test steps."""

    def report(same, distance, loss):
        same = tf.cast(same, distance.dtype)
        predicted_same = tf.cast(distance < margin / 2, distance.dtype)
        model.loss_tracker.update_state(loss)
        model.pair_accuracy.update_state(tf.cast(tf.equal(predicted_same, same), tf.float32))
        # Mean distance of the same-digit pairs and of the different ones (weighted by the mask).
        model.same_distance.update_state(distance, sample_weight=same)
        model.different_distance.update_state(distance, sample_weight=1.0 - same)
        return {
            m.name: m.result()
            for m in (model.loss_tracker, model.pair_accuracy, model.same_distance, model.different_distance)
        }

    def train_step(trainer, data):
        pairs, same, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            distance = model(pairs, training=True)
            loss = contrastive_loss(same, distance, margin)
        trainer.apply_gradients(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return report(same, distance, loss)

    def test_step(trainer, data):
        pairs, same, _ = keras.utils.unpack_x_y_sample_weight(data)
        distance = model(pairs, training=False)
        return report(same, distance, contrastive_loss(same, distance, margin))

    return train_step, test_step


def plugins(run_dir: Path, steps_per_epoch: int, patience: int, clip: float) -> list[Any]:
    """The plugin stack, by entry-point name, as a config file would list it."""
    return [
        # norm=: each weight's gradient clipped on its own (Keras's clipnorm)
        {"name": "gradient_clipping", "norm": clip, "log_norm": True},
        {
            "name": "lr_schedule",
            "schedule": "exponential",
            "initial_learning_rate": 2e-3,
            "decay_steps": steps_per_epoch,
            "decay_rate": 0.85,
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
            "run_name": "contrastive",
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
        "--steps-per-epoch", type=int, default=None, help="batches per epoch (default: every training pair once)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--margin", type=float, default=1.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--patience", type=int, default=4, help="early stopping patience (epochs)")
    parser.add_argument("--clip", type=float, default=1.0, help="L2 norm each gradient tensor is clipped to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("corebus-runs") / "contrastive", help="run directory")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    run_dir = args.out.resolve()
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_val, y_val) = load_digits_split(seed=args.seed)
    train_pairs, train_same = make_pairs(x_train, y_train, seed=args.seed)
    val_pairs, val_same = make_pairs(x_val, y_val, seed=args.seed + 1)

    model = Siamese(hidden=args.hidden)
    model({k: v[:1] for k, v in train_pairs.items()})  # builds it: Keras refuses to save an unbuilt model
    train_step, test_step = make_steps(model, args.margin)
    steps = args.steps_per_epoch or math.ceil(len(train_same) / args.batch_size)
    trainer = corebus.Trainer(
        model,
        optimizer=keras.optimizers.Adam(2e-3),
        train_step=train_step,
        test_step=test_step,
        plugins=plugins(run_dir, steps, args.patience, args.clip),
        seed=args.seed,
    )
    history = trainer.fit(
        train_pairs,
        train_same,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        validation_data=(val_pairs, val_same),
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
