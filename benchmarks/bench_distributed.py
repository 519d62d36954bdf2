"""corebus under ``tf.distribute.MirroredStrategy`` on two logical CPU devices.

(a) a raw strategy loop: ``experimental_distribute_dataset`` of a shuffled, batched tf.data
    pipeline, ``strategy.run`` of a GradientTape step that tracks a loss mean and accuracy,
    losses reduced across replicas -- what a user writes by hand
(b) ``Trainer(strategy=...).fit`` with no plugins
(c) ``Trainer.fit`` on one device (no strategy), for scale

Digits MLP 64-256-256-10, global batch 128 (64 per replica), Adam, the same number of steps per
variant; variants interleaved, ``--repeats`` rounds, medians. The point is (b)/(a): what corebus
costs under a strategy (target >= 0.95). CPU "devices" share the same two cores, so (a)/(c)
shows no speed-up; it is not the point. Run: ``python benchmarks/bench_distributed.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Two logical devices must exist before anything touches TensorFlow's runtime.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

import corebus  # noqa: E402
from corebus.demo import digits_mlp  # noqa: E402

from bench_engine import load_data  # noqa: E402
from results import record  # noqa: E402

GLOBAL_BATCH = 128


def raw_strategy_loop(strategy, x, y, epochs):
    with strategy.scope():
        model = digits_mlp()
        optimizer = keras.optimizers.Adam()
        optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        loss_mean = keras.metrics.Mean()
        accuracy = keras.metrics.SparseCategoricalAccuracy()

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            y_pred = model(xb, training=True)
            loss = loss_fn(yb, y_pred)  # a Keras loss divides by the replica count itself
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        loss_mean.update_state(loss * strategy.num_replicas_in_sync)
        accuracy.update_state(yb, y_pred)
        return loss

    @tf.function
    def step(xb, yb):
        losses = strategy.run(replica_step, args=(xb, yb))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    steps = 0
    data = tf.data.Dataset.from_tensor_slices((x, y))
    for epoch in range(epochs):
        loss_mean.reset_state()
        accuracy.reset_state()
        batches = data.shuffle(len(x), seed=epoch).batch(GLOBAL_BATCH, drop_remainder=True).prefetch(2)
        for xb, yb in strategy.experimental_distribute_dataset(batches):
            step(xb, yb)
            steps += 1
    return steps


def trainer_fit(strategy, x, y, epochs):
    if strategy is not None:
        with strategy.scope():
            model = digits_mlp()
    else:
        model = digits_mlp()
    trainer = corebus.Trainer(
        model, optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"], strategy=strategy, seed=0
    )
    trainer.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs, verbose=0)
    return trainer.global_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40, help="14 steps per epoch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = load_data()
    variants = {
        "(a) raw strategy loop": lambda e: raw_strategy_loop(strategy, x, y, e),
        "(b) Trainer(strategy=...)": lambda e: trainer_fit(strategy, x, y, e),
        "(c) Trainer, one device": lambda e: trainer_fit(None, x, y, e),
    }
    rates = {name: [] for name in variants}
    for repeat in range(args.repeats):
        names = list(variants)
        for name in names[repeat % 3 :] + names[: repeat % 3]:  # rotate: the machine drifts
            variants[name](1)  # warm-up: tracing is not steady-state speed
            start = time.perf_counter()
            steps = variants[name](args.epochs)
            rates[name].append(steps / (time.perf_counter() - start))
    base = rates["(a) raw strategy loop"]
    print(
        f"MirroredStrategy, 2 logical CPU devices, global batch {GLOBAL_BATCH}, {steps} steps per run, "
        f"{args.repeats} rounds"
    )
    print(f"{'variant':<30}{'steps/s':>10}{'/ (a)':>8}")
    for name, runs in rates.items():
        ratio = statistics.median(r / b for r, b in zip(runs, base))
        print(f"{name:<30}{statistics.median(runs):>10.0f}{ratio:>8.3f}")
    record(
        "distributed",
        "Trainer(strategy=MirroredStrategy) / raw strategy loop",
        statistics.median(r / b for r, b in zip(rates["(b) Trainer(strategy=...)"], base)),
        ">= 0.95",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
