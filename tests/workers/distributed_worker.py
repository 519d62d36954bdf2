"""One training process for the tf.distribute tests (run as a subprocess).

    python distributed_worker.py OUT_DIR --mode single|mirrored|multiworker [--rank R --ports P0,P1]
        [--stop-rank R --stop-epoch E] [--es-min-delta D] [--backup [--kill-at-step N]]

``mirrored`` splits the CPU into two logical devices (MirroredStrategy, one process);
``multiworker`` is one of two processes of a MultiWorkerMirroredStrategy cluster on 127.0.0.1
(TF_CONFIG). Every mode trains the same model on the same global batches with a checkpoint,
early stopping, MLflow (a sqlite store in OUT_DIR) and a recorder, then writes
OUT_DIR/rank<R>.npz (final weights) and OUT_DIR/rank<R>.json (history, steps, what ran).
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--mode", choices=["single", "mirrored", "multiworker"], required=True)
parser.add_argument("--rank", type=int, default=0)
parser.add_argument("--ports", default="")
parser.add_argument("--stop-rank", type=int, default=None)
parser.add_argument("--stop-epoch", type=int, default=None)
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--kill-at-step", type=int, default=None)
parser.add_argument("--backup", action="store_true")
parser.add_argument("--es-min-delta", type=float, default=1e-3)
parser.add_argument("--signal-rank", type=int, default=None)
parser.add_argument("--signal-epoch", type=int, default=None)
args = parser.parse_args()

if args.mode == "multiworker":
    workers = [f"127.0.0.1:{port}" for port in args.ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": args.rank}}
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.experimental.enable_op_determinism()
if args.mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.testing import tiny_data  # noqa: E402

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
strategy = {
    "single": lambda: None,
    "mirrored": lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    "multiworker": lambda: tf.distribute.MultiWorkerMirroredStrategy(),
}[args.mode]()


class Seen:
    """What ran on this process: epochs, the global step, epoch losses."""

    def __init__(self):
        self.epochs, self.losses = [], []

    @hookimpl
    def on_epoch_end(self, trainer, epoch, logs):
        self.epochs.append(epoch)
        self.losses.append(logs["loss"])


class StopOnOneWorker:
    """A stop decided on one worker only (as a plugin reading a local signal would)."""

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        if trainer.rank == args.stop_rank and epoch == args.stop_epoch:
            trainer.stop_training = True


class SignalOnOneWorker:
    """SIGTERM to one worker's own process at an epoch end; every worker records how it ended."""

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        if trainer.rank == args.signal_rank and epoch == args.signal_epoch:
            os.kill(os.getpid(), signal.SIGTERM)

    @hookimpl
    def on_exception(self, trainer, exception):
        (out / f"rank{args.rank}-stopped.json").write_text(
            json.dumps(
                {"exception": type(exception).__name__, "global_step": trainer.global_step, "epochs": seen.epochs}
            )
        )


class KillAt:
    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer):
        if args.kill_at_step is not None and trainer.global_step >= args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3, activation="softmax")]
    )


if strategy is not None:
    with strategy.scope():
        model = build()
else:
    model = build()

seen = Seen()
plugins = [
    seen,
    StopOnOneWorker(),
    SignalOnOneWorker(),
    {"name": "gradient_clipping", "global_norm": 5.0},
    {"name": "early_stopping", "monitor": "val_loss", "patience": 1, "min_delta": args.es_min_delta},
    {
        "name": "checkpoint",
        "filepath": str(out / "ckpt" / "ep{epoch:02d}.weights.h5"),
        "save_weights_only": True,
        "monitor": "val_loss",
    },
    {
        "name": "mlflow",
        "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
        "experiment_name": "dist",
        "dir": str(out / f"mlflow-spool-{args.rank}"),
        "log_every_n_steps": 2,
    },
]
if args.backup:
    plugins += [{"name": "backup", "backup_dir": str(out / "backup"), "save_freq": 3, "background": False}, KillAt()]
trainer = corebus.Trainer(
    model,
    keras.optimizers.SGD(0.2),
    "sparse_categorical_crossentropy",
    ["accuracy"],
    plugins=plugins,
    strategy=strategy,
    seed=0,
)
x, y = tiny_data(120)  # validation_split 0.2: 96 train (8 steps of 12), 24 validation (2 of 12)
history = trainer.fit(x, y, batch_size=12, epochs=args.epochs, validation_split=0.2, verbose=0, shuffle=True)
np.savez(out / f"rank{args.rank}.npz", *[w.numpy() for w in model.weights])
(out / f"rank{args.rank}.json").write_text(
    json.dumps(
        {
            "history": history.history,
            "global_step": trainer.global_step,
            "epochs": seen.epochs,
            "is_chief": trainer.is_chief,
            "rank": trainer.rank,
            "num_workers": trainer.num_workers,
            "num_replicas": trainer.num_replicas,
            "plugins": list(trainer.bus.plugins),
        }
    )
)
sys.exit(0)
