"""SGD, SGD + momentum, RMSprop, Adam and AdamW side by side, logged to MLflow and plotted.

Each optimizer trains the same digits MLP from the same initial weights and data order. Each
run is logged by the ``mlflow`` plugin to one MLflow experiment in a local sqlite store under
the run directory (one MLflow run per optimizer, named after it: params, per-epoch metrics,
status). At the end the program prints a table and writes ``val_loss.png``, the validation
loss per epoch of every optimizer::

    python examples/compare_optimizers.py --epochs 15
    mlflow ui --backend-store-uri sqlite:///corebus-runs/compare_optimizers/mlflow.db
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import corebus  # noqa: E402
from corebus.demo import digits_mlp, load_digits_split  # noqa: E402

EXPERIMENT = "compare-optimizers"
NAMES = ["sgd", "sgd_momentum", "rmsprop", "adam", "adamw"]


def optimizers(sgd_lr: float, adaptive_lr: float) -> dict[str, Any]:
    """Fresh optimizers, by run name (each run needs its own instance)."""
    return {
        "sgd": keras.optimizers.SGD(sgd_lr),
        "sgd_momentum": keras.optimizers.SGD(sgd_lr, momentum=0.9),
        "rmsprop": keras.optimizers.RMSprop(adaptive_lr),
        "adam": keras.optimizers.Adam(adaptive_lr),
        "adamw": keras.optimizers.AdamW(adaptive_lr, weight_decay=0.01),
    }


def plot(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        epochs = range(1, len(history["val_loss"]) + 1)
        axes.plot(epochs, history["val_loss"], marker="o", label=name)
    axes.set(xlabel="epoch", ylabel="val_loss", title="digits MLP: validation loss per optimizer", yscale="log")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--steps-per-epoch", type=int, default=None, help="batches per epoch (default: the whole training set once)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sgd-lr", type=float, default=0.05, help="learning rate of both SGD runs")
    parser.add_argument("--adaptive-lr", type=float, default=1e-3, help="learning rate of RMSprop, Adam, AdamW")
    parser.add_argument("--optimizers", nargs="+", choices=NAMES, default=NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("corebus-runs") / "compare_optimizers", help="run directory")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    run_dir = args.out.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), (x_val, y_val) = load_digits_split(seed=args.seed)
    histories = {}
    for name, optimizer in optimizers(args.sgd_lr, args.adaptive_lr).items():
        if name not in args.optimizers:
            continue
        mlflow = {
            "name": "mlflow",
            "tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}",
            "experiment_name": EXPERIMENT,
            "run_name": name,
            "dir": str(run_dir / "mlflow"),
            "log_every_n_steps": None,
            "tags": {"optimizer": type(optimizer).__name__},
        }
        trainer = corebus.Trainer(
            digits_mlp(seed=args.seed),
            optimizer,
            "sparse_categorical_crossentropy",
            ["accuracy"],
            plugins=[mlflow],
            seed=args.seed,
        )
        histories[name] = trainer.fit(
            x_train,
            y_train,
            batch_size=args.batch_size,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            validation_data=(x_val, y_val),
            verbose=0,
        ).history
        if args.verbose:
            print(f"{name}: val_loss {histories[name]['val_loss'][-1]:.4f}", flush=True)

    plot(histories, run_dir / "val_loss.png")
    if args.verbose:
        print(f"\n{'optimizer':<14}{'best val_loss':>14}{'epoch':>7}{'final val_loss':>16}{'final val_acc':>15}")
        for name, h in sorted(histories.items(), key=lambda item: min(item[1]["val_loss"])):
            best = min(range(len(h["val_loss"])), key=h["val_loss"].__getitem__)
            print(
                f"{name:<14}{h['val_loss'][best]:>14.4f}{best + 1:>7}{h['val_loss'][-1]:>16.4f}"
                f"{h['val_accuracy'][-1]:>15.4f}"
            )
        print(f"\nplot:   {run_dir / 'val_loss.png'}")
        print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{run_dir / 'mlflow.db'}")
    return histories


if __name__ == "__main__":
    main()
