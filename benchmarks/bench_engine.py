"""Engine overhead, side by side in one process, on the same model and data.

(a) a raw ``tf.function`` GradientTape loop (tf.data shuffle + batch, loss mean and accuracy
    tracked as the other variants do)                 -- what a user writes by hand
(b) ``Trainer.fit`` with no plugins
(c) ``Trainer.fit`` with a no-op plugin implementing every batch hook
(d) ``model.fit``
(e) ``model.fit`` with the corebus adapter carrying the same no-op plugin

Digits MLP 64-256-256-10, batch 64, Adam. Each variant trains a fresh model for the same
number of steps; variants run interleaved, ``--repeats`` times, and the median steps/s is
reported with ratios to (a). Run: ``python benchmarks/bench_engine.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.demo import digits_mlp  # noqa: E402

from results import record  # noqa: E402

BATCH = 64


class NoOpBatchHooks:
    """Implements every batch hook and does nothing (reads no logs, so forces no sync)."""

    @hookimpl
    def on_train_batch_begin(self, batch):
        pass

    @hookimpl
    def on_train_batch_end(self, batch, logs):
        pass

    @hookimpl
    def on_log(self, kind, step):
        pass


def load_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype("float32"), digits.target.astype("int32")


def raw_loop(x, y, epochs):
    model = digits_mlp()
    optimizer = keras.optimizers.Adam()
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    optimizer.build(model.trainable_variables)
    # The same bookkeeping the other variants do: a running loss mean and accuracy.
    loss_mean = keras.metrics.Mean()
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    dataset = tf.data.Dataset.from_tensor_slices((x, y))

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            y_pred = model(xb, training=True)
            loss = loss_fn(yb, y_pred)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        loss_mean.update_state(loss)
        accuracy.update_state(yb, y_pred)
        return loss

    steps = 0
    for epoch in range(epochs):
        loss_mean.reset_state()
        accuracy.reset_state()
        for xb, yb in dataset.shuffle(len(x), seed=epoch).batch(BATCH).prefetch(2):
            step(xb, yb)
            steps += 1
    return steps


def trainer_fit(x, y, epochs, plugins=()):
    trainer = corebus.Trainer(
        digits_mlp(),
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=list(plugins),
        seed=0,
    )
    trainer.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    return trainer.global_step


def model_fit(x, y, epochs, callbacks=()):
    model = digits_mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=list(callbacks))
    return int(model.optimizer.iterations.numpy())


VARIANTS = {
    "a_raw_tf_function": lambda x, y, e: raw_loop(x, y, e),
    "b_trainer": lambda x, y, e: trainer_fit(x, y, e),
    "c_trainer_noop_hooks": lambda x, y, e: trainer_fit(x, y, e, [NoOpBatchHooks()]),
    "d_model_fit": lambda x, y, e: model_fit(x, y, e),
    "e_model_fit_adapter": lambda x, y, e: model_fit(x, y, e, [corebus.KerasCallback([NoOpBatchHooks()])]),
}


def measure(run, x, y, epochs):
    run(x, y, 1)  # warm-up: tracing and first-call costs are not steady-state speed
    start = time.perf_counter()
    steps = run(x, y, epochs)
    return steps / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=70, help="~29 steps per epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args(argv)
    x, y = load_data()
    samples = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, run in VARIANTS.items():
            samples[name].append(measure(run, x, y, args.epochs))
    median = {name: statistics.median(v) for name, v in samples.items()}
    raw = median["a_raw_tf_function"]
    print(f"{'variant':<24}{'steps/s':>10}{'/ (a)':>8}")
    for name, value in median.items():
        print(f"{name:<24}{value:>10.0f}{value / raw:>8.3f}")
    ratios = {
        "b/a": median["b_trainer"] / raw,
        "c/a": median["c_trainer_noop_hooks"] / raw,
        "b/d": median["b_trainer"] / median["d_model_fit"],
        "e/d": median["e_model_fit_adapter"] / median["d_model_fit"],
    }
    print("  ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    record("engine", "Trainer.fit / raw tf.function loop", ratios["b/a"], ">= 0.98")
    record("engine", "Trainer.fit + no-op plugin / raw loop", ratios["c/a"], ">= 0.98")
    record("engine", "Trainer.fit / model.fit", ratios["b/d"], ">= 1.15")
    record("engine", "Trainer.fit", median["b_trainer"], unit="steps/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"steps_per_s": median, "samples": samples, "ratios": ratios}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
