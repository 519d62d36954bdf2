"""Learning-rate schedules, the corebus way: exponential, step, cosine and warm-up + cosine.

Each schedule is one ``lr_schedule`` plugin (``corebus.plugins.LRSchedule``) on the same
digits MLP; the plugin computes the LR inside the compiled step from the optimizer's update
count (no host round-trip per step) and writes the LR each epoch ended with to the epoch logs
as ``learning_rate``. The program prints one column per schedule and saves them, with each
run's ``val_loss``, to ``lr_schedules.json``::

    python examples/lr_schedules.py --epochs 10
    python examples/lr_schedules.py --schedules cosine warmup

The schedules are Keras's own (``keras.optimizers.schedules``), so the values are the ones a
Keras user expects: ``exponential`` is ``ExponentialDecay``, ``step`` is ``ExponentialDecay(...,
staircase=True)``, ``cosine`` is ``CosineDecay``, ``warmup`` is ``CosineDecay`` with its
linear ``warmup_steps`` / ``warmup_target``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import corebus  # noqa: E402
from corebus.demo import digits_mlp, load_digits_split  # noqa: E402
from corebus.plugins import LRSchedule  # noqa: E402


def schedules(lr: float, steps_per_epoch: int, epochs: int) -> dict[str, LRSchedule]:
    """One plugin per recipe; steps count optimizer updates."""
    total = steps_per_epoch * epochs
    return {
        # lr * 0.8 ** (step / steps_per_epoch): a smooth 20 % decay per epoch
        "exponential": LRSchedule("exponential", initial_learning_rate=lr, decay_steps=steps_per_epoch, decay_rate=0.8),
        # halve every two epochs (a staircase)
        "step": LRSchedule("step", initial_learning_rate=lr, drop=0.5, decay_steps=2 * steps_per_epoch),
        # half a cosine from lr down to 5 % of it over the whole run
        "cosine": LRSchedule("cosine", initial_learning_rate=lr, decay_steps=total, alpha=0.05),
        # one epoch of linear warm-up from 0 to lr, then the cosine over the rest of the run
        "warmup": LRSchedule(
            "cosine",
            initial_learning_rate=0.0,
            warmup_target=lr,
            warmup_steps=steps_per_epoch,
            decay_steps=max(1, total - steps_per_epoch),
            alpha=0.05,
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--steps-per-epoch", type=int, default=None, help="batches per epoch (default: the whole training set once)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=0.1, help="peak learning rate (SGD)")
    parser.add_argument(
        "--schedules",
        nargs="+",
        choices=["exponential", "step", "cosine", "warmup"],
        default=["exponential", "step", "cosine", "warmup"],
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("corebus-runs") / "lr_schedules", help="run directory")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_val, y_val) = load_digits_split(seed=args.seed)
    steps = args.steps_per_epoch or math.ceil(len(x_train) / args.batch_size)
    plugins = schedules(args.learning_rate, steps, args.epochs)
    results: dict[str, Any] = {"steps_per_epoch": steps, "epochs": args.epochs, "schedules": {}}
    for name in args.schedules:
        trainer = corebus.Trainer(
            digits_mlp(seed=args.seed),
            "sgd",
            "sparse_categorical_crossentropy",
            ["accuracy"],
            plugins=[plugins[name]],
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
        )
        results["schedules"][name] = {key: history.history[key] for key in ("learning_rate", "val_loss")}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lr_schedules.json").write_text(json.dumps(results, indent=2))
    if args.verbose:
        names = list(results["schedules"])
        print(f"learning rate at the end of each epoch ({steps} updates per epoch)")
        print("epoch " + "".join(f"{n:>13}" for n in names))
        for epoch in range(args.epochs):
            print(
                f"{epoch + 1:>5} " + "".join(f"{results['schedules'][n]['learning_rate'][epoch]:>13.6f}" for n in names)
            )
        print("val_loss " + "  ".join(f"{n}={results['schedules'][n]['val_loss'][-1]:.4f}" for n in names))
        print(f"saved {args.out / 'lr_schedules.json'}")
    return results


if __name__ == "__main__":
    main()
