"""A small sweep of Adam's hyper-parameters: ``learning_rate`` x ``beta_1`` x ``epsilon``.

Every combination trains the same digits MLP from the same initial weights and data order
(``corebus.Trainer(seed=...)``), with early stopping on ``val_loss`` keeping each run's best
epoch. The table (best ``val_loss``, its ``val_accuracy`` and epoch, per combination, best
first) is printed and written to ``results.csv``::

    python examples/adam_hyperparameters.py --epochs 10
    python examples/adam_hyperparameters.py --learning-rates 1e-3 1e-2 --beta-1 0.9 0.5 --epsilon 1e-7 1e-3
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import corebus  # noqa: E402
from corebus.demo import digits_mlp, load_digits_split  # noqa: E402
from corebus.plugins import EarlyStopping  # noqa: E402

COLUMNS = ["learning_rate", "beta_1", "epsilon", "best_val_loss", "val_accuracy", "best_epoch", "epochs_run"]


def train(learning_rate: float, beta_1: float, epsilon: float, data: tuple, args: argparse.Namespace) -> dict:
    (x_train, y_train), (x_val, y_val) = data
    stopper = EarlyStopping(monitor="val_loss", patience=args.patience, restore_best_weights=True)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate, beta_1=beta_1, epsilon=epsilon)
    trainer = corebus.Trainer(
        digits_mlp(seed=args.seed),
        optimizer,
        "sparse_categorical_crossentropy",
        ["accuracy"],
        plugins=[stopper],
        seed=args.seed,
    )
    history = trainer.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        validation_data=(x_val, y_val),
        verbose=0,
    ).history
    best = stopper.best_epoch
    return {
        "learning_rate": learning_rate,
        "beta_1": beta_1,
        "epsilon": epsilon,
        "best_val_loss": history["val_loss"][best],
        "val_accuracy": history["val_accuracy"][best],
        "best_epoch": best + 1,
        "epochs_run": len(history["val_loss"]),
        "optimizer_config": trainer.optimizer.get_config(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--beta-1", type=float, nargs="+", default=[0.9, 0.5])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1e-7, 1e-3])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--steps-per-epoch", type=int, default=None, help="batches per epoch (default: the whole training set once)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--patience", type=int, default=3, help="early stopping patience (epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("corebus-runs") / "adam_hyperparameters", help="run directory (results.csv)"
    )
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    data = load_digits_split(seed=args.seed)
    rows = []
    for learning_rate, beta_1, epsilon in itertools.product(args.learning_rates, args.beta_1, args.epsilon):
        rows.append(train(learning_rate, beta_1, epsilon, data, args))
        if args.verbose:
            print(
                f"lr={learning_rate:g} beta_1={beta_1:g} epsilon={epsilon:g}: "
                f"best val_loss {rows[-1]['best_val_loss']:.4f}",
                flush=True,
            )
    rows.sort(key=lambda row: row["best_val_loss"])

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if args.verbose:
        print("\n" + " ".join(f"{c:>13}" for c in COLUMNS))
        for row in rows:
            print(" ".join(f"{row[c]:>13.4g}" if isinstance(row[c], float) else f"{row[c]:>13}" for c in COLUMNS))
        print(f"\nsaved {args.out / 'results.csv'}")
    return rows


if __name__ == "__main__":
    main()
