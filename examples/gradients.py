"""Gradient clipping and gradient accumulation, compiled into the step by two plugins.

- ``clipping``: ``GradientClipping(global_norm=c)`` rescales the gradients so their global norm
  is at most ``c`` before the optimizer applies them (Keras's ``global_clipnorm``). With plain
  SGD at learning rate ``lr`` no update can then move the weights by more than ``lr * c``; the
  ``UpdateNorms`` plugin below measures every update to show it.
- ``accumulation``: ``GradientAccumulation(steps=k)`` sums the gradients of ``k`` micro-batches
  and applies their mean as one update: ``batches / k`` optimizer steps, and, with SGD and an
  unshuffled dataset, the same weights as training on batches ``k`` times larger (with the
  memory of the small batch).

Both also work in ``model.fit``: ``model.compile(optimizer=callback.wrap_optimizer("sgd"))``::

    python examples/gradients.py --epochs 3 --clip 0.5 --accumulate 4
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.demo import digits_mlp, load_digits_split  # noqa: E402
from corebus.plugins import GradientAccumulation, GradientClipping  # noqa: E402


class UpdateNorms:
    """Records the L2 norm of each optimizer update (weights after minus before a train call).

    For demonstration: it copies the weights to the host twice per step, which a production
    plugin would not do (``GradientClipping(log_norm=True)`` reads the norm from the device).
    """

    def __init__(self):
        self.norms: list[float] = []
        self._before: list[np.ndarray] | None = None

    @hookimpl
    def on_train_batch_begin(self, trainer):
        self._before = trainer.model.get_weights()

    @hookimpl
    def on_train_batch_end(self, trainer):
        after = trainer.model.get_weights()
        self.norms.append(float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, self._before)))))


def clipping(args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> corebus.Trainer:
    updates = UpdateNorms()
    trainer = corebus.Trainer(
        digits_mlp(seed=args.seed),
        keras.optimizers.SGD(args.learning_rate),
        "sparse_categorical_crossentropy",
        plugins=[GradientClipping(global_norm=args.clip, log_norm=True), updates],
        seed=args.seed,
    )
    trainer.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
    if args.verbose:
        print(
            f"clipping: global norm <= {args.clip}; last pre-clip gradient norm "
            f"{trainer.bus.plugins['GradientClipping'].last_norm:.3f}; largest update "
            f"{max(updates.norms):.5f} <= lr * clip = {args.learning_rate * args.clip:.5f} "
            f"over {len(updates.norms)} updates"
        )
    return trainer


def accumulation(args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> tuple[corebus.Trainer, corebus.Trainer]:
    k, batch = args.accumulate, args.batch_size
    n = len(x) // (k * batch) * (k * batch)  # whole big batches, so both runs see the same samples
    x, y = x[:n], y[:n]
    runs = []
    for plugins, batch_size in (([GradientAccumulation(steps=k)], batch), ([], k * batch)):
        trainer = corebus.Trainer(
            digits_mlp(seed=args.seed),
            keras.optimizers.SGD(args.learning_rate),
            "sparse_categorical_crossentropy",
            plugins=plugins,
            seed=args.seed,
        )
        trainer.fit(x, y, batch_size=batch_size, epochs=args.epochs, shuffle=False, verbose=0)
        runs.append(trainer)
    small, big = runs
    if args.verbose:
        difference = max(float(np.abs(a - b).max()) for a, b in zip(small.model.get_weights(), big.model.get_weights()))
        print(
            f"accumulation: {args.epochs * n // batch} micro-batches of {batch} -> "
            f"{int(small.optimizer.iterations.numpy())} updates (global_step {small.global_step}); "
            f"batch {k * batch}: {int(big.optimizer.iterations.numpy())} updates; "
            f"largest weight difference {difference:.2e}"
        )
    return small, big


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["clipping", "accumulation", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="the (micro-)batch size")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--clip", type=float, default=0.5, help="global norm the gradients are clipped to")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--samples", type=int, default=None, help="train on the first N samples only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("corebus-runs") / "gradients",
        help="run directory (gradients.json: what each run measured)",
    )
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    (x, y), _ = load_digits_split(seed=args.seed)
    x, y = x[: args.samples], y[: args.samples]
    results: dict[str, Any] = {}
    if args.mode in ("clipping", "both"):
        results["clipping"] = clipping(args, x, y)
    if args.mode in ("accumulation", "both"):
        results["accumulation"] = accumulation(args, x, y)
    summary = {}
    if "clipping" in results:
        trainer = results["clipping"]
        summary["clipping"] = {
            "clip": args.clip,
            "learning_rate": args.learning_rate,
            "last_pre_clip_norm": trainer.bus.plugins["GradientClipping"].last_norm,
            "update_norms": trainer.bus.plugins["UpdateNorms"].norms,
        }
    if "accumulation" in results:
        small, big = results["accumulation"]
        summary["accumulation"] = {
            "steps": args.accumulate,
            "micro_batches": small.micro_step,
            "updates": int(small.optimizer.iterations.numpy()),
            "big_batch_updates": int(big.optimizer.iterations.numpy()),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gradients.json").write_text(json.dumps(summary, indent=2))
    return results


if __name__ == "__main__":
    main()
