"""A custom logging plugin: every N epochs, save the model's validation predictions to a file.

The plugin is a plain class with one ``@hookimpl`` method; ``corebus.Cadence`` decides when it
is due (here on the epoch count: due after epochs N, 2N, ...). Each file is an ``.npz`` with
the predicted class probabilities, the labels and the epoch, written atomically, so a reader
(a notebook, a dashboard) never sees half a file. The same instance works in
``corebus.Trainer.fit`` and in ``model.fit`` through ``corebus.KerasCallback``::

    python examples/save_predictions.py --epochs 10 --every 2
    python examples/save_predictions.py --epochs 10 --every 2 --keras     # inside model.fit
    python -c "import numpy as np; f = np.load('corebus-runs/save_predictions/predictions/epoch004.npz'); print(f['predictions'].shape)"
"""  # noqa: E501 - a command to copy whole

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import corebus  # noqa: E402
from corebus import Cadence, hookimpl  # noqa: E402
from corebus.demo import digits_mlp, load_digits_split  # noqa: E402
from corebus.kit import atomic_path, check_writable  # noqa: E402


class SavePredictions:
    """Every ``every`` epochs, write ``model.predict(x)`` (and ``y``) to ``<directory>/epochNNN.npz``."""

    runs_on = "chief"  # under tf.distribute: one writer
    error_policy = "warn"  # a full disk should not end the run: warn and carry on

    def __init__(
        self, x: Any, y: Any = None, every: int = 5, directory: str | os.PathLike = "predictions", batch_size: int = 256
    ):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.every = int(every)
        self.cadence = Cadence.every_n(self.every)
        self.directory = Path(directory)
        check_writable(self.directory, "SavePredictions")  # fail before training, not at epoch N
        self.saved: list[str] = []

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        # `epoch` is 0-based: epochs done went from `epoch` to `epoch + 1`.
        if not self.cadence.due(epoch, epoch + 1):
            return
        predictions = trainer.model.predict(self.x, batch_size=self.batch_size, verbose=0)
        path = self.directory / f"epoch{epoch + 1:03d}.npz"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    predictions=predictions,
                    labels=np.asarray(self.y) if self.y is not None else np.array([]),
                    epoch=epoch + 1,
                    step=trainer.global_step,
                )
        self.saved.append(path.name)

    # Saved with every run snapshot and restored on resume: the list of files written so far.
    def state_dict(self) -> dict[str, Any]:
        return {"saved": list(self.saved)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = list(state["saved"])


def main(argv: list[str] | None = None) -> tuple[SavePredictions, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--every", type=int, default=2, help="save the predictions every N epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keras", action="store_true", help="train with model.fit + corebus.KerasCallback")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("corebus-runs") / "save_predictions", help="run directory")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_val, y_val) = load_digits_split(seed=args.seed)
    saver = SavePredictions(x_val, y_val, every=args.every, directory=args.out.resolve() / "predictions")
    model = digits_mlp(seed=args.seed)
    fit = dict(batch_size=args.batch_size, epochs=args.epochs, validation_data=(x_val, y_val), verbose=args.verbose)
    if args.keras:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(x_train, y_train, callbacks=[corebus.KerasCallback([saver])], **fit)
    else:
        trainer = corebus.Trainer(
            model, "adam", "sparse_categorical_crossentropy", ["accuracy"], plugins=[saver], seed=args.seed
        )
        history = trainer.fit(x_train, y_train, **fit)
    if args.verbose:
        print(f"saved {', '.join(saver.saved)} under {saver.directory}")
    return saver, history


if __name__ == "__main__":
    main()
