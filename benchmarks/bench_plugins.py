"""The control-plugin stack against a raw loop and against model.fit with Keras's callbacks.

Same model and data as ``bench_engine.py`` (digits MLP 64-256-256-10, batch 64, Adam), with a
10 % validation split, in one process, interleaved, median of ``--repeats``:

(a) raw ``tf.function`` loop doing the same work by hand: train on 90 %, the same cosine LR
    schedule (in the optimizer), global-norm clipping in the step, loss / accuracy tracking,
    a compiled validation pass per epoch
(b) ``Trainer.fit`` with the stack: checkpoint (every epoch, best only; atomic + fsync, written
    on a background thread), early stopping,
    plateau LR, a cosine LR schedule, global-norm clipping, progress bar
(c) ``Trainer.fit`` with no plugins and the same validation split
(d) ``model.fit`` with the Keras equivalents: ModelCheckpoint, EarlyStopping,
    ReduceLROnPlateau, LearningRateScheduler (cosine per epoch; a per-step schedule and a
    plateau cannot be combined in Keras), ``global_clipnorm``, progress bar

Progress bars write to a null stream in both. Run: ``python benchmarks/bench_plugins.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus.demo import digits_mlp  # noqa: E402

from bench_engine import BATCH, load_data  # noqa: E402
from results import record  # noqa: E402

PATIENCE = 10_000  # never stop: every variant trains the same number of steps


def raw_loop(x, y, epochs):
    split = int(len(x) * 0.9)
    (xt, yt), (xv, yv) = (x[:split], y[:split]), (x[split:], y[split:])
    model = digits_mlp()
    total_steps = epochs * math.ceil(split / BATCH)
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, total_steps))
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    loss_mean, accuracy = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            y_pred = model(xb, training=True)
            loss = loss_fn(yb, y_pred)
        grads, _ = tf.clip_by_global_norm(tape.gradient(loss, model.trainable_variables), 1.0)
        optimizer.apply(grads, model.trainable_variables)
        loss_mean.update_state(loss)
        accuracy.update_state(yb, y_pred)

    @tf.function(reduce_retracing=True)
    def val_step(xb, yb):
        y_pred = model(xb, training=False)
        loss_mean.update_state(loss_fn(yb, y_pred))
        accuracy.update_state(yb, y_pred)

    train = tf.data.Dataset.from_tensor_slices((xt, yt))
    val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(BATCH)
    steps = 0
    for epoch in range(epochs):
        loss_mean.reset_state()
        accuracy.reset_state()
        for xb, yb in train.shuffle(len(xt), seed=epoch).batch(BATCH).prefetch(2):
            train_step(xb, yb)
            steps += 1
        loss_mean.reset_state()
        accuracy.reset_state()
        for xb, yb in val:
            val_step(xb, yb)
        float(loss_mean.result())
    return steps


def corebus_stack(directory, steps_total, null):
    from corebus.plugins import (
        EarlyStopping,
        GradientClipping,
        LRSchedule,
        ModelCheckpoint,
        ProgressBar,
        ReduceLROnPlateau,
    )

    return [
        LRSchedule("cosine", initial_learning_rate=1e-3, decay_steps=steps_total),
        ReduceLROnPlateau(monitor="val_loss", patience=PATIENCE),
        GradientClipping(global_norm=1.0),
        EarlyStopping(monitor="val_loss", patience=PATIENCE),
        ModelCheckpoint(
            os.path.join(directory, "best.weights.h5"),
            monitor="val_loss",
            save_best_only=True,
            save_weights_only=True,
            background=True,
        ),
        ProgressBar(stream=null),
    ]


def trainer_fit(x, y, epochs, plugins):
    trainer = corebus.Trainer(
        digits_mlp(),
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=plugins,
        seed=0,
    )
    trainer.fit(x, y, batch_size=BATCH, epochs=epochs, validation_split=0.1, verbose=1 if plugins else 0)
    return trainer.global_step


def keras_fit(x, y, epochs, directory, null):
    steps_per_epoch = math.ceil(len(x) * 0.9 / BATCH)
    total = epochs * steps_per_epoch

    def cosine(epoch, lr):
        return float(keras.optimizers.schedules.CosineDecay(1e-3, total)(epoch * steps_per_epoch))

    model = digits_mlp()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=1.0),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = [
        keras.callbacks.LearningRateScheduler(cosine),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=PATIENCE),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE),
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "best.weights.h5"), monitor="val_loss", save_best_only=True, save_weights_only=True
        ),
    ]
    with contextlib.redirect_stdout(null):
        model.fit(x, y, batch_size=BATCH, epochs=epochs, validation_split=0.1, verbose=1, callbacks=callbacks)
    return int(model.optimizer.iterations.numpy())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=70)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    x, y = load_data()
    null = open(os.devnull, "w")
    directory = tempfile.mkdtemp(prefix="corebus-bench-")
    steps_total = args.epochs * math.ceil(len(x) * 0.9 / BATCH)
    variants = {
        "a_raw_tf_function": lambda e: raw_loop(x, y, e),
        "b_trainer_stack": lambda e: trainer_fit(x, y, e, corebus_stack(directory, steps_total, null)),
        "c_trainer_no_plugins": lambda e: trainer_fit(x, y, e, []),
        "d_model_fit_keras_callbacks": lambda e: keras_fit(x, y, e, directory, null),
    }
    samples = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            run(1)
            start = time.perf_counter()
            steps = run(args.epochs)
            samples[name].append(steps / (time.perf_counter() - start))
    median = {k: statistics.median(v) for k, v in samples.items()}
    raw = median["a_raw_tf_function"]
    print(f"{'variant':<30}{'steps/s':>10}{'/ (a)':>8}")
    for name, value in median.items():
        print(f"{name:<30}{value:>10.0f}{value / raw:>8.3f}")
    print(
        f"stack/raw = {median['b_trainer_stack'] / raw:.3f}   "
        f"stack/model.fit+callbacks = {median['b_trainer_stack'] / median['d_model_fit_keras_callbacks']:.3f}"
    )
    record("plugins", "full stack / raw loop doing the same work", median["b_trainer_stack"] / raw, ">= 0.95")
    record(
        "plugins",
        "full stack / model.fit + Keras callbacks",
        median["b_trainer_stack"] / median["d_model_fit_keras_callbacks"],
        ">= 1.15",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
