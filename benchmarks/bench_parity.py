"""The one-line move: ``corebus.Trainer(model).fit(...)`` against ``model.fit(...)``, same
compiled model, same arguments, the same Keras callback objects.

Digits MLP 64-256-256-10, batch 64, Adam, as in ``bench_engine.py`` / ``bench_plugins.py``; in one
process, variants interleaved, ``--repeats`` rounds, each run after a one-epoch warm-up; the
ratios are the median over rounds of each round's ratio:

(a) the raw ``tf.function`` loop of ``bench_engine.py`` (no validation, no callbacks)
(b) ``corebus.Trainer(model).fit(x, y)``: no callbacks, no validation
(c) ``model.fit(..., validation_split=0.1, callbacks=keras_callbacks())``
(d) ``corebus.Trainer(model).fit(...)``: the same call as (c), the same callbacks

``keras_callbacks()`` is Keras's own EarlyStopping, ReduceLROnPlateau, ModelCheckpoint
(``save_best_only=True``), CSVLogger and TensorBoard (``update_freq=100``), fresh objects for
each run; patience is out of reach, so every run trains the same number of steps. Both fits run
with ``verbose=0`` (a progress bar is not one of the five callbacks).

Targets: (d) / (c) >= 1.3 (a user who moves gets faster with nothing else changed) and
(b) / (a) >= 0.98. Run: ``python benchmarks/bench_parity.py [--epochs 70] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import corebus  # noqa: E402
from corebus.demo import digits_mlp  # noqa: E402

from bench_engine import BATCH, load_data, raw_loop  # noqa: E402
from results import record  # noqa: E402

PATIENCE = 10_000  # never stop, never reduce: every variant trains the same number of steps


def keras_callbacks(directory: str) -> list:
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=PATIENCE),
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "best.weights.h5"), monitor="val_loss", save_best_only=True, save_weights_only=True
        ),
        keras.callbacks.CSVLogger(os.path.join(directory, "history.csv")),
        keras.callbacks.TensorBoard(log_dir=os.path.join(directory, "tb"), update_freq=100),
    ]


def compiled_model() -> keras.Model:
    model = digits_mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit(x, y, epochs: int, engine: bool, with_callbacks: bool) -> int:
    """One run; the only difference between the engine and Keras is the fit line itself."""
    model = compiled_model()
    directory = tempfile.mkdtemp(prefix="corebus-bench-parity-")
    arguments = dict(batch_size=BATCH, epochs=epochs, verbose=0)
    if with_callbacks:
        arguments.update(validation_split=0.1, callbacks=keras_callbacks(directory))
    try:
        if engine:
            corebus.Trainer(model).fit(x, y, **arguments)
        else:
            model.fit(x, y, **arguments)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return int(model.optimizer.iterations.numpy())


VARIANTS = {
    "(a) raw tf.function loop": lambda x, y, e: raw_loop(x, y, e),
    "(b) Trainer(model).fit()": lambda x, y, e: fit(x, y, e, engine=True, with_callbacks=False),
    "(c) model.fit(callbacks=...)": lambda x, y, e: fit(x, y, e, engine=False, with_callbacks=True),
    "(d) Trainer(model).fit(callbacks=...)": lambda x, y, e: fit(x, y, e, engine=True, with_callbacks=True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=70, help="~29 steps per epoch (~26 with validation)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if "callbacks" not in inspect.signature(corebus.Trainer.fit).parameters:
        print(
            "bench_parity: corebus.Trainer.fit takes no callbacks= in this version, so Keras callbacks "
            "cannot run in the engine and there is nothing to compare",
            file=sys.stderr,
        )
        return 2
    x, y = load_data()
    samples = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, run in VARIANTS.items():
            run(x, y, 1)  # warm-up: tracing and first-call costs are not steady-state speed
            start = time.perf_counter()
            steps = run(x, y, args.epochs)
            samples[name].append(steps / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in samples.items()}
    a, b, c, d = samples.values()
    # each round's ratio pairs runs that were close in time, so a slow spell of a shared machine
    # falls on both sides; the median over rounds is the result
    moved = statistics.median(dd / cc for cc, dd in zip(c, d))
    bare = statistics.median(bb / aa for aa, bb in zip(a, b))
    print(f"{args.epochs} epochs, {args.repeats} rounds")
    print(f"{'variant':<40}{'steps/s':>9}   each round")
    for name, values in samples.items():
        print(f"{name:<40}{median[name]:>9.0f}   " + " ".join(f"{v:.0f}" for v in values))
    print("(d)/(c) each round: " + " ".join(f"{dd / cc:.3f}" for cc, dd in zip(c, d)))
    print("(b)/(a) each round: " + " ".join(f"{bb / aa:.3f}" for aa, bb in zip(a, b)))
    record(
        "parity",
        "Trainer(model).fit(callbacks=[5 Keras callbacks]) / model.fit with the same callbacks",
        moved,
        ">= 1.3",
    )
    record("parity", "Trainer(model).fit() / raw tf.function loop", bare, ">= 0.98")
    return 0


if __name__ == "__main__":
    sys.exit(main())
