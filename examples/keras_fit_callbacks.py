"""Keras's callback recipes inside ``model.fit``, the corebus way: one ``corebus.KerasCallback``.

Each recipe is the usual ``model.fit`` program; the training features are corebus plugins
(the same objects ``corebus.Trainer`` runs), handed to Keras through the adapter:

- ``checkpoint``: the two best weight files by ``val_loss``, plus ``last.weights.h5``;
- ``early_stopping``: stop when ``val_loss`` stops improving, restore the best weights;
- ``plateau``: halve the learning rate when ``val_loss`` stops improving;
- ``tensorboard``: Keras's TensorBoard tags, read by any TensorBoard dashboard;
- ``combined``: all four, plus gradient clipping through the optimizer wrapper (one line).

``--recipe all`` (the default) runs every recipe in sequence, each into its own folder::

    python examples/keras_fit_callbacks.py --epochs 20
    python examples/keras_fit_callbacks.py --recipe plateau --patience 2
    tensorboard --logdir corebus-runs/keras_fit_callbacks/tensorboard/tensorboard
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
from corebus.integrations import TensorBoardLogger  # noqa: E402
from corebus.plugins import EarlyStopping, GradientClipping, ModelCheckpoint, ReduceLROnPlateau  # noqa: E402


def checkpoint(run_dir: Path, args: argparse.Namespace) -> list[Any]:
    return [
        ModelCheckpoint(
            run_dir / "checkpoints" / "epoch{epoch:02d}-{val_loss:.4f}.weights.h5",
            monitor="val_loss",
            save_weights_only=True,
            save_top_k=2,
            save_last=True,
        )
    ]


def early_stopping(run_dir: Path, args: argparse.Namespace) -> list[Any]:
    return [
        EarlyStopping(monitor="val_loss", patience=args.patience, min_delta=args.min_delta, restore_best_weights=True)
    ]


def plateau(run_dir: Path, args: argparse.Namespace) -> list[Any]:
    return [
        ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=args.patience, min_delta=args.min_delta, min_lr=1e-5)
    ]


def tensorboard(run_dir: Path, args: argparse.Namespace) -> list[Any]:
    return [TensorBoardLogger(run_dir / "tensorboard", update_freq=10)]


def combined(run_dir: Path, args: argparse.Namespace) -> list[Any]:
    # List order is call order: the plateau and early stopping see the epoch first, the
    # checkpoint then saves a state that already includes their decisions.
    return [
        *plateau(run_dir, args),
        *early_stopping(run_dir, args),
        *checkpoint(run_dir, args),
        *tensorboard(run_dir, args),
        GradientClipping(global_norm=1.0),
    ]


RECIPES = {f.__name__: f for f in (checkpoint, early_stopping, plateau, tensorboard, combined)}


def run_recipe(name: str, args: argparse.Namespace, data: tuple) -> tuple[keras.Model, Any, corebus.KerasCallback]:
    """Plain Keras: build, compile, fit; corebus only as the callback (and optimizer wrapper)."""
    (x_train, y_train), (x_val, y_val) = data
    run_dir = args.out.resolve() / name
    callback = corebus.KerasCallback(RECIPES[name](run_dir, args))
    model = digits_mlp(seed=args.seed)
    model.compile(
        optimizer=callback.wrap_optimizer(keras.optimizers.Adam(args.learning_rate)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_val, y_val),
        callbacks=[callback],
        verbose=args.verbose,
    )
    return model, history, callback


def main(argv: list[str] | None = None) -> dict[str, tuple[keras.Model, Any, corebus.KerasCallback]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--patience", type=int, default=3, help="early stopping and plateau patience (epochs)")
    parser.add_argument("--min-delta", type=float, default=1e-3, help="smallest val_loss change that counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("corebus-runs") / "keras_fit_callbacks",
        help="run directory (one folder per recipe)",
    )
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    data = load_digits_split(seed=args.seed)
    results = {}
    for name in RECIPES if args.recipe == "all" else [args.recipe]:
        if args.verbose:
            print(f"\n== {name}")
        results[name] = model, history, callback = run_recipe(name, args, data)
        if args.verbose:
            h = history.history
            print(
                f"{name}: {len(h['loss'])} epochs, best val_loss {min(h['val_loss']):.4f}, "
                f"final learning rate {float(model.optimizer.learning_rate):.2e}"
            )
    return results


if __name__ == "__main__":
    main()
