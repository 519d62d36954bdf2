"""A GAN on a ring of eight Gaussians, trained by ``corebus.Trainer`` with a custom step.

The discriminator and the generator take turns in one step, each with its own optimizer
(``optimizer={"generator": ..., "discriminator": ...}``). The plugins address them by name:
gradient clipping on the discriminator only, a cosine learning-rate schedule on the generator
only, and early stopping / checkpoints on how far the generated points are from the ring's
modes. Everything is written under the run directory::

    python examples/gan.py --epochs 30
    tensorboard --logdir corebus-runs/gan/tensorboard
    mlflow ui --backend-store-uri sqlite:///corebus-runs/gan/mlflow.db
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402

MODES, RADIUS, STDDEV = 8, 2.0, 0.05


def mode_centers() -> np.ndarray:
    """The eight centres on a circle of radius ``RADIUS``."""
    angles = 2 * np.pi * np.arange(MODES) / MODES
    return (RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype("float32")


def ring_of_gaussians(n: int, seed: int = 0) -> np.ndarray:
    """``n`` points: a random mode each, plus Gaussian noise of ``STDDEV``."""
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, MODES, size=n)
    return (mode_centers()[modes] + rng.normal(scale=STDDEV, size=(n, 2))).astype("float32")


class GAN(keras.Model):
    """A generator (noise -> 2-D point) and a discriminator (point -> logit), with the running
    means the step reports (corebus resets a model's metrics at each epoch, as Keras does)."""

    def __init__(self, noise_dim: int = 8, hidden: int = 64, seed: int = 0):
        super().__init__()
        self.noise_dim = noise_dim
        self.generator = keras.Sequential(
            [
                keras.Input((noise_dim,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(2),
            ],
            name="generator",
        )
        self.discriminator = keras.Sequential(
            [
                keras.Input((2,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(1),
            ],
            name="discriminator",
        )
        # A variable, so checkpoints and resumed runs carry the noise stream too.
        self.noise_seed = keras.random.SeedGenerator(seed)
        self.d_loss = keras.metrics.Mean(name="d_loss")
        self.g_loss = keras.metrics.Mean(name="g_loss")
        self.mode_distance = keras.metrics.Mean(name="mode_distance")
        self.modes_covered = keras.metrics.Mean(name="modes_covered")

    def call(self, noise):
        return self.generator(noise)

    def noise(self, batch_size):
        return keras.random.normal((batch_size, self.noise_dim), seed=self.noise_seed)


def make_train_step(gan: GAN):
    """The custom step: one discriminator update, then one generator update (non-saturating loss)."""
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    centers = tf.constant(mode_centers())

    def train_step(trainer, data):
        real, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = tf.shape(real)[0]
        ones, zeros = tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))
        generator, discriminator = gan.generator, gan.discriminator

        with tf.GradientTape() as tape:
            fake = generator(gan.noise(batch_size), training=True)
            d_loss = bce(ones, discriminator(real, training=True)) + bce(zeros, discriminator(fake, training=True))
        # apply_gradients runs the gradient pipeline of the named optimizer (here: clipping).
        trainer.apply_gradients(
            tape.gradient(d_loss, discriminator.trainable_variables),
            discriminator.trainable_variables,
            optimizer="discriminator",
        )

        with tf.GradientTape() as tape:
            fake = generator(gan.noise(batch_size), training=True)
            g_loss = bce(ones, discriminator(fake, training=True))
        trainer.apply_gradients(
            tape.gradient(g_loss, generator.trainable_variables), generator.trainable_variables, optimizer="generator"
        )

        # Sample quality, without a discriminator: how far each fake point is from its nearest
        # mode (real data: about STDDEV * 1.25), and the share of modes that got a fake point.
        distances = tf.norm(fake[:, None, :] - centers[None, :, :], axis=-1)
        nearest = tf.argmin(distances, axis=1, output_type=tf.int32)
        hit = tf.reduce_max(tf.one_hot(nearest, MODES), axis=0)
        gan.d_loss.update_state(d_loss)
        gan.g_loss.update_state(g_loss)
        gan.mode_distance.update_state(tf.reduce_mean(tf.reduce_min(distances, axis=1)))
        gan.modes_covered.update_state(tf.reduce_mean(hit))
        return {m.name: m.result() for m in (gan.d_loss, gan.g_loss, gan.mode_distance, gan.modes_covered)}

    return train_step


def plugins(run_dir: Path, total_steps: int, patience: int, clip: float) -> list[Any]:
    """The plugin stack, by entry-point name, as a config file would list it."""
    return [
        # Only the discriminator is clipped: its gradients are the ones that spike.
        {"name": "gradient_clipping", "global_norm": clip, "optimizers": ["discriminator"], "log_norm": True},
        # Only the generator's LR decays; the discriminator keeps its constant LR.
        {
            "name": "lr_schedule",
            "schedule": "cosine",
            "decay_steps": total_steps,
            "alpha": 0.1,
            "optimizers": ["generator"],
        },
        # Losses of a GAN do not say when it is good; the distance to the modes does: lower is better.
        {
            "name": "early_stopping",
            "monitor": "mode_distance",
            "mode": "min",
            "patience": patience,
            "restore_best_weights": True,
        },
        {
            "name": "checkpoint",
            "filepath": str(run_dir / "checkpoints" / "epoch{epoch:02d}-{mode_distance:.3f}.weights.h5"),
            "monitor": "mode_distance",
            "mode": "min",
            "save_weights_only": True,
            "save_top_k": 2,
            "save_last": True,
        },
        {"name": "tensorboard", "log_dir": str(run_dir / "tensorboard"), "update_freq": 10},
        {
            "name": "mlflow",
            "tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}",
            "experiment_name": "corebus-examples",
            "run_name": "gan",
            "dir": str(run_dir / "mlflow"),
            "log_every_n_steps": 10,
        },
    ]


def main(argv: list[str] | None = None) -> corebus.Trainer:
    """Train from the command line (``argv``: the arguments, default ``sys.argv[1:]``); returns
    the trainer, whose ``history``, ``bus.plugins`` and ``model`` tell how the run went."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=50,
        help="batches per epoch (the data set is this many batches of fresh samples)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64, help="units per hidden layer")
    parser.add_argument("--patience", type=int, default=8, help="early stopping patience (epochs)")
    parser.add_argument(
        "--clip", type=float, default=1.0, help="global norm the discriminator's gradients are clipped to"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("corebus-runs") / "gan", help="run directory")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    run_dir = args.out.resolve()
    keras.utils.set_random_seed(args.seed)
    real = ring_of_gaussians(args.steps_per_epoch * args.batch_size, seed=args.seed)
    gan = GAN(hidden=args.hidden, seed=args.seed)
    # The custom step calls the two halves, never the model itself; one call marks it built
    # (Keras refuses to save the weights of a model that was never called).
    gan(np.zeros((1, gan.noise_dim), "float32"))
    trainer = corebus.Trainer(
        gan,
        optimizer={
            "discriminator": keras.optimizers.Adam(1e-3, beta_1=0.5),
            "generator": keras.optimizers.Adam(2e-3, beta_1=0.5),
        },
        train_step=make_train_step(gan),
        plugins=plugins(run_dir, args.epochs * args.steps_per_epoch, args.patience, args.clip),
        seed=args.seed,
    )
    history = trainer.fit(real, batch_size=args.batch_size, epochs=args.epochs, verbose=args.verbose)
    if args.verbose:
        last = {k: round(v[-1], 4) for k, v in history.history.items()}
        print(f"\nlast epoch: {last}\nrun directory: {run_dir}")
        print(f"  tensorboard --logdir {run_dir / 'tensorboard'}")
        print(f"  mlflow ui --backend-store-uri sqlite:///{run_dir / 'mlflow.db'}")
    return trainer


if __name__ == "__main__":
    main()
