"""A training run for the graceful-preemption tests (run as a subprocess).

    python preempt_worker.py OUT_DIR [--signal-at-step N] [--signal SIGTERM] [--accumulate K] [--wide]

Seeds come from Keras's global seed state (``keras.utils.set_random_seed``; ``Trainer(seed=None)``),
as in a user's script. ``--signal-at-step`` sends the signal to this process (a real signal) when
that global step ends; the engine answers it at the next step boundary. The run logs to a CSV
file, TensorBoard and a local MLflow store, and keeps run snapshots (``backup``). A finished run
writes OUT_DIR/final.npz; every run appends what it saw to OUT_DIR/process.jsonl.
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.testing import tiny_data  # noqa: E402


class SignalAt:
    def __init__(self, step, signum, out):
        self.step, self.signum, self.out = step, signum, out
        self.steps_seen = []

    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer):
        self.steps_seen.append(trainer.micro_step)
        if self.step is not None and trainer.micro_step == self.step and self.signum == signal.SIGKILL:
            with open(self.out / "process.jsonl", "a") as handle:  # nothing after SIGKILL runs
                handle.write(json.dumps({"pid": os.getpid(), "steps_seen": self.steps_seen}) + "\n")
        if self.step is not None and trainer.micro_step == self.step:
            (self.out / "signal_sent").write_text(json.dumps({"at": time.time(), "micro_step": trainer.micro_step}))
            os.kill(os.getpid(), self.signum)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--signal-at-step", type=int)
    parser.add_argument("--signal", default="SIGTERM", help="SIGKILL: killed there, as by the OOM killer")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--wide", action="store_true", help="a ~50 MB state (model and Adam slots)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(3)
    x, y = tiny_data(n=192)
    hidden = 2000 if args.wide else 16
    layers = [keras.Input((4,)), keras.layers.Dense(hidden, activation="relu")]
    if args.wide:
        layers.append(keras.layers.Dense(hidden, activation="relu"))
    model = keras.Sequential(layers + [keras.layers.Dropout(0.2), keras.layers.Dense(3, activation="softmax")])
    signum = int(signal.Signals[args.signal])
    watcher = SignalAt(args.signal_at_step, signum, out)
    plugins = [
        {"name": "backup", "backup_dir": str(out / "backup"), "save_freq": "epoch"},
        {"name": "csv_logger", "filename": str(out / "history.csv")},
        {"name": "tensorboard", "log_dir": str(out / "tb"), "update_freq": 1},
        {
            "name": "mlflow",
            "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
            "experiment_name": "preempt",
            "dir": str(out / "mlflow"),
            "run_name": "preempt",
        },
        watcher,
    ]
    if args.accumulate > 1:
        plugins.append({"name": "gradient_accumulation", "steps": args.accumulate})
    trainer = corebus.Trainer(
        model,
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=plugins,
        stop_signals=("SIGTERM", "SIGUSR1"),
    )
    record = {"pid": os.getpid(), "seed": trainer.seed}
    try:
        trainer.fit(x, y, batch_size=16, epochs=4, validation_split=0.25, verbose=0)
        np.savez(out / "final.npz", *model.get_weights())
        record["finished"] = True
    finally:
        record["steps_seen"] = watcher.steps_seen
        with open(out / "process.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
