"""Steady-state step rate with the three loggers attached vs none.

Digits MLP (as bench_engine), ~1500 steps per run, interleaved, median of ``--repeats``:
(a) ``Trainer.fit`` with no loggers
(b) with TensorBoard + MLflow (local sqlite store) + W&B (offline), each logging batch metrics
    every 10 steps and epoch metrics every epoch

The rate is measured over the last two thirds of the epochs (a clock plugin), so it shows what
the loggers cost per step, not their one-off start-up (creating MLflow's sqlite store and
starting W&B's service take about 2 s on the loggers' threads, competing with the first
epochs for the 2 cores) or their bounded shutdown. Run:
``python benchmarks/bench_loggers.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_SILENT", "true")

sys.path.insert(0, os.path.dirname(__file__))

from bench_engine import BATCH, load_data  # noqa: E402
from results import record  # noqa: E402

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.demo import digits_mlp  # noqa: E402


class StepClock:
    def __init__(self, warmup_epochs: int = 0):
        self.warmup_epochs = warmup_epochs
        self.first = self.last = None
        self.first_step = self.last_step = 0

    @hookimpl(tryfirst=True)
    def on_train_batch_end(self, trainer):
        if trainer.epoch < self.warmup_epochs:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first, self.first_step = now, trainer.global_step
        self.last, self.last_step = now, trainer.global_step

    def rate(self):
        return (self.last_step - self.first_step) / (self.last - self.first)


def loggers(directory):
    from corebus.integrations import MLflowLogger, TensorBoardLogger, WandbLogger

    return [
        TensorBoardLogger(log_dir=os.path.join(directory, "tb"), update_freq=10),
        MLflowLogger(tracking_uri=f"sqlite:///{directory}/mlflow.db", dir=os.path.join(directory, "mlflow"), log_every_n_steps=10),
        WandbLogger(mode="offline", dir=directory, log_every_n_steps=10),
    ]


def run(x, y, epochs, with_loggers):
    clock = StepClock(warmup_epochs=epochs // 3)
    plugins = [clock] + (loggers(tempfile.mkdtemp(prefix="corebus-bench-")) if with_loggers else [])
    trainer = corebus.Trainer(digits_mlp(), optimizer="adam", loss="sparse_categorical_crossentropy",
                              metrics=["accuracy"], plugins=plugins, seed=0)
    trainer.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    return clock.rate()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    x, y = load_data()
    samples = {"a_no_loggers": [], "b_three_loggers": []}
    for _ in range(args.repeats):
        samples["a_no_loggers"].append(run(x, y, args.epochs, False))
        samples["b_three_loggers"].append(run(x, y, args.epochs, True))
    median = {k: statistics.median(v) for k, v in samples.items()}
    for name, value in median.items():
        print(f"{name:<18}{value:>8.0f} steps/s   runs: {' '.join(f'{v:.0f}' for v in samples[name])}")
    print(f"loggers / none = {median['b_three_loggers'] / median['a_no_loggers']:.3f}")
    record("loggers", "TensorBoard + MLflow + W&B every 10 steps / no loggers",
           median["b_three_loggers"] / median["a_no_loggers"], ">= 0.95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
