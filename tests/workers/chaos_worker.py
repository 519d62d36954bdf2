"""A training run with every logger, for the kill-anywhere tests (run as a subprocess).

    python chaos_worker.py OUT_DIR [--kill WHERE]

WHERE says where the process sends SIGKILL to itself:

- ``step:N``        at the end of global step N (``on_train_batch_end``, after the backup's save);
- ``write:K``       in the middle of writing this process's K-th run snapshot (half a file);
- ``epoch_end:E``   in epoch E's ``on_epoch_end``, before its snapshot is taken;
- ``epoch_log:E``   right after epoch E's record reached the loggers (``on_log``), after its snapshot;
- ``validation:E``  in the second validation batch of epoch E;
- ``train_end``     in the end phase (``on_train_end``, between the loggers' closes).

The stack: backup (a snapshot every 5 steps, written in the background), checkpoint (top 2),
csv_logger, TensorBoard, MLflow (local sqlite store), W&B (offline) and the run report, every
logger at every step. Training is bit-deterministic on the CPU (``Trainer(seed=0)``, op
determinism), so a killed-and-resumed run can be compared with an uninterrupted one. A finished
run writes OUT_DIR/final.npz; every process appends what it did to OUT_DIR/process.jsonl.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the W&B helpers

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.testing import tiny_data  # noqa: E402

from wandb_reader import offline_environment  # noqa: E402

EPOCHS, BATCH, SAVE_FREQ, N = 5, 16, 5, 256  # 12 steps an epoch (validation_split 0.25), 60 steps


class Killer:
    """Sends SIGKILL where ``--kill`` says; counts the steps this process trained. Before the
    kill it appends where the run was to OUT_DIR/process.jsonl (a killed process writes nothing else)."""

    def __init__(self, where: str | None, out: Path):
        self.where, self.out = where, out
        self.kind, _, at = (where or "").partition(":")
        self.at = int(at) if at else None
        self.steps = 0
        self.trainer = None

    def get_config(self) -> dict:
        return {}  # not the run's configuration: the run params of every process stay the same

    @hookimpl
    def on_train_begin(self, trainer):
        self.trainer = trainer

    def die(self, trainer=None) -> None:
        trainer = trainer or self.trainer
        backup = next(p for p in trainer.bus.plugins.values() if type(p).__name__ == "BackupAndRestore")
        record = {
            "pid": os.getpid(),
            "kill": self.where,
            "killed_at_step": trainer.global_step,
            "epoch": trainer.epoch,
            "steps": self.steps,
            "restored_step": backup.restored_step,
        }
        with open(self.out / "process.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        os.kill(os.getpid(), signal.SIGKILL)

    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer):
        self.steps += 1
        if self.kind == "step" and trainer.global_step == self.at:
            self.die(trainer)

    @hookimpl(trylast=True)
    def on_epoch_end(self, trainer, epoch):
        if self.kind == "epoch_end" and epoch == self.at:
            self.die(trainer)

    @hookimpl(trylast=True)
    def on_log(self, trainer, kind):
        if self.kind == "epoch_log" and kind == "epoch" and trainer.epoch == self.at:
            self.die(trainer)

    @hookimpl
    def on_test_batch_end(self, trainer, batch):
        if self.kind == "validation" and trainer.epoch == self.at and batch == 1:
            self.die(trainer)

    @hookimpl
    def on_train_end(self, trainer):
        if self.kind == "train_end":
            self.die(trainer)


def kill_during_write(k: int, killer: Killer) -> None:
    real_savez = np.savez
    calls = {"n": 0}

    def savez(file, *args, **arrays):
        calls["n"] += 1
        if calls["n"] == k:
            with open(file, "wb") as handle:  # half a file, then the process dies
                handle.write(b"PK\x03\x04 partial")
                handle.flush()
                os.fsync(handle.fileno())
            killer.die()
        return real_savez(file, *args, **arrays)

    np.savez = savez


def wandb_environment(out: Path) -> None:
    os.environ.update(offline_environment(out))
    os.environ.pop("WANDB_PROJECT", None)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wandb_environment(out)
    tf.config.experimental.enable_op_determinism()
    killer = Killer(args.kill, out)
    if killer.kind == "write":
        kill_during_write(killer.at, killer)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    plugins = [
        {"name": "backup", "backup_dir": str(out / "backup"), "save_freq": SAVE_FREQ, "background": True},
        {
            "name": "checkpoint",
            "filepath": str(out / "ckpt" / "w-{epoch:02d}.weights.h5"),
            "save_weights_only": True,
            "monitor": "val_loss",
            "save_top_k": 2,
        },
        {"name": "csv_logger", "filename": str(out / "history.csv")},
        {"name": "tensorboard", "log_dir": str(out / "tb"), "update_freq": 1},
        {
            "name": "mlflow",
            "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
            "experiment_name": "chaos",
            "dir": str(out / "mlflow"),
            "run_name": "chaos",
            "log_every_n_steps": 1,
        },
        {"name": "wandb", "project": "chaos", "mode": "offline", "dir": str(out), "log_every_n_steps": 1},
        {"name": "report", "report_dir": str(out / "report"), "log_every_n_steps": 1},
        killer,
    ]
    x, y = tiny_data(n=N)
    trainer = corebus.Trainer(
        model,
        optimizer=keras.optimizers.Adam(0.02),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=plugins,
        seed=0,
    )
    record = {"pid": os.getpid(), "kill": args.kill}
    try:
        trainer.fit(x, y, batch_size=BATCH, epochs=EPOCHS, validation_split=0.25, verbose=0)
        np.savez(out / "final.npz", *model.get_weights())
        record["finished"] = True
    finally:
        backup = next(p for p in trainer.bus.plugins.values() if type(p).__name__ == "BackupAndRestore")
        record.update(
            steps=killer.steps,
            restored_step=getattr(backup, "restored_step", None),
            wandb_run_id=next(
                (getattr(p, "run_id", None) for p in trainer.bus.plugins.values() if type(p).__name__ == "WandbLogger"),
                None,
            ),
        )
        with open(out / "process.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
