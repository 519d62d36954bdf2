"""A training run for the kill / resume tests (run as a subprocess).

    python resume_worker.py OUT_DIR [--kill-at-step N] [--kill-during-write K] [--kill-in-train-end]
                            [--step-sleep S] [--mode engine|keras]

Trains with a backup plugin (and the stateful control plugins) and, when it finishes, writes
the final weights and every plugin's state to OUT_DIR/final.npz and OUT_DIR/final.json.
``--kill-at-step`` sends SIGKILL to itself when that global step is reached;
``--kill-during-write`` sends SIGKILL in the middle of writing the K-th snapshot;
``--kill-in-train-end`` sends SIGKILL from a plugin's ``on_train_end`` listed after the backup
(the end phase); ``--step-sleep`` slows every step (a run that holds its directories a while).
Every run keeps a ``history.csv`` (csv_logger) and writes OUT_DIR/process.json: the steps this
process trained and the step it resumed from.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.testing import tiny_data  # noqa: E402

EPOCHS, BATCH, SAVE_FREQ = 6, 16, 5


def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.2),  # exercises the seed-generator state
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


class KillAt:
    def __init__(self, step):
        self.step = step

    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer):
        if self.step is not None and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInTrainEnd:
    @hookimpl
    def on_train_end(self):
        os.kill(os.getpid(), signal.SIGKILL)


class ThisProcess:
    """Counts the steps trained by this process (not part of the run's state)."""

    def __init__(self, sleep):
        self.steps, self.sleep = 0, sleep

    @hookimpl
    def on_train_batch_end(self):
        self.steps += 1
        if self.sleep:
            time.sleep(self.sleep)


class StepTrace:
    """Stateful, like a user plugin: records the LR it saw at every step."""

    def __init__(self):
        self.lrs = {}

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.lrs[str(trainer.global_step)] = trainer.lr.value

    def state_dict(self):
        return {"lrs": self.lrs}

    def load_state_dict(self, state):
        self.lrs = dict(state["lrs"])


def kill_during_write(k):
    real_savez = np.savez
    calls = {"n": 0}

    def savez(file, **arrays):
        calls["n"] += 1
        if calls["n"] == k:
            with open(file, "wb") as handle:  # half a file, then the process dies
                handle.write(b"PK\x03\x04 partial")
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_savez(file, **arrays)

    np.savez = savez


def plugins(args):
    from corebus.plugins import BackupAndRestore, CSVLogger

    chosen = [
        BackupAndRestore(str(Path(args.out) / "backup"), save_freq=SAVE_FREQ, background=True),
        StepTrace(),
        KillAt(args.kill_at_step),
        CSVLogger(Path(args.out) / "history.csv"),
    ]
    if args.kill_in_train_end:
        chosen.append(KillInTrainEnd())
    for name, params in (
        ("early_stopping", {"patience": 2, "min_delta": 0.01, "restore_best_weights": True}),
        ("reduce_lr_on_plateau", {"patience": 1, "factor": 0.5, "min_delta": 0.01}),
        ("lr_schedule", {"schedule": "exponential", "decay_steps": 10, "decay_rate": 0.9}),
    ):
        chosen.append(corebus.bus.registry.resolve(dict(name=name, **params)))
    return chosen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-during-write", type=int)
    parser.add_argument("--kill-in-train-end", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--mode", default="engine", choices=("engine", "keras"))
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()
    if args.kill_during_write:
        kill_during_write(args.kill_during_write)
    x, y = tiny_data(n=256)
    active = plugins(args)
    this_process = ThisProcess(args.step_sleep)
    if args.mode == "engine":
        trainer = corebus.Trainer(
            model(),
            optimizer=keras.optimizers.Adam(0.02),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            plugins=active + [this_process],
            seed=0,
        )
        history = trainer.fit(x, y, batch_size=BATCH, epochs=EPOCHS, validation_split=0.25, verbose=0)
        weights = trainer.model.get_weights()
    else:
        m = model()
        callback = corebus.KerasCallback(active + [this_process])
        m.compile(
            optimizer=callback.wrap_optimizer(keras.optimizers.Adam(0.02)),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        history = m.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, validation_split=0.25, verbose=0, shuffle=False, callbacks=[callback]
        )
        weights = m.get_weights()
    np.savez(Path(args.out) / "final.npz", *weights)
    states = {type(p).__name__: p.state_dict() for p in active if hasattr(p, "state_dict")}
    optimizer = trainer.optimizer if args.mode == "engine" else m.optimizer
    states["final_lr"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    if args.mode == "engine":
        # Keras's own History callback in model.fit starts empty on every fit, resumed or not.
        states["history"] = history.history
    Path(args.out, "final.json").write_text(json.dumps(states, sort_keys=True, default=float))
    Path(args.out, "process.json").write_text(
        json.dumps({"steps": this_process.steps, "restored_step": active[0].restored_step})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
