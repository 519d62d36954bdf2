"""``corebus demo``: the digits dataset (bundled with scikit-learn), the engine, the plugins."""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_digits_split(seed: int = 0):
    """Digits (8x8 images, 10 classes) scaled to [0, 1], split 80/20; no download."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def digits_mlp(seed: int = 0):
    """The benchmark model: an MLP 64-256-256-10."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def run_demo(epochs: int = 10, batch_size: int = 64, verbose: int = 1) -> dict:
    import corebus

    (x_train, y_train), (x_test, y_test) = load_digits_split()
    trainer = corebus.Trainer(
        digits_mlp(),
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        seed=0,
        profile=True,
    )
    print(f"corebus {corebus.__version__} demo: digits ({len(x_train)} train / {len(x_test)} test), "
          f"MLP 64-256-256-10, {epochs} epochs")
    print(trainer.describe())
    start = time.perf_counter()
    history = trainer.fit(
        x_train, y_train, batch_size=batch_size, epochs=epochs, validation_split=0.1, verbose=verbose
    )
    seconds = time.perf_counter() - start
    test = trainer.evaluate(x_test, y_test, verbose=0, return_dict=True)
    _print_summary(history, trainer, seconds, test)
    return {"history": history.history, "test": test, "seconds": seconds}


def _print_summary(history, trainer, seconds: float, test: dict) -> None:
    keys = list(history.history)
    header = ["epoch"] + keys
    rows = [[str(e + 1)] + [f"{history.history[k][i]:.4f}" for k in keys] for i, e in enumerate(history.epoch)]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print("\nSummary")
    print(line)
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths)))
    print(line)
    for row in rows:
        print(" | ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print(line)
    steps = trainer.global_step
    print(f"steps: {steps}   time: {seconds:.1f}s   steps/s: {steps / seconds:.0f}")
    print("test: " + "   ".join(f"{k}={v:.4f}" for k, v in test.items()))
