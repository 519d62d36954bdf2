"""Steady-state step rate with the three loggers attached vs none.

Digits MLP (as bench_engine), 29 steps per epoch, variants interleaved (ab, ba, ab...), median
of ``--repeats``:
(a) ``Trainer.fit`` with no loggers
(b) with TensorBoard + MLflow (local sqlite store) + W&B (offline), each logging batch metrics
    every ``--every`` steps (10, the loggers' default) and epoch metrics every epoch
(c) with ``--isolation``: (b) with MLflow's client on its sink's thread in this process
    (``isolate_sdk=False``) where (b) runs it in a child process (``isolate_sdk=True``): whether
    the child is worth its machinery (a 5 % steps/s bar)

The rate is measured from the first step after every logger has delivered its first batch
(its backend is up) and the first third of the epochs, to the last step (a clock plugin), so it
shows what the loggers cost per step, not their one-off start-up (MLflow's import and sqlite
store creation, about 3 s of CPU, and W&B's service, about 1 s, competing with the first
epochs for the cores: reported separately, in seconds) or their bounded shutdown. Run:
``python benchmarks/bench_loggers.py [--every 1] [--isolation]``.
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

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.demo import digits_mlp  # noqa: E402

from bench_engine import BATCH, load_data  # noqa: E402
from results import record  # noqa: E402


class StepClock:
    """Steps/s from the first step after ``ready()`` (and ``warmup_epochs``) to the last."""

    def __init__(self, warmup_epochs: int = 0, ready=lambda: True):
        self.warmup_epochs = warmup_epochs
        self.ready = ready
        self.first = self.last = None
        self.first_step = self.last_step = 0
        self.started = time.perf_counter()
        self.ready_after = None  # seconds from the first step until the loggers were up

    @hookimpl(tryfirst=True)
    def on_train_batch_end(self, trainer):
        now = time.perf_counter()
        if self.ready_after is None:
            if trainer.global_step == 1:
                self.started = now
            if not self.ready():
                return
            self.ready_after = now - self.started
        if trainer.epoch < self.warmup_epochs:
            return
        if self.first is None:
            self.first, self.first_step = now, trainer.global_step
        self.last, self.last_step = now, trainer.global_step

    def rate(self):
        return (self.last_step - self.first_step) / (self.last - self.first)


def delivered(plugins):
    """Whether every logger's sink has delivered its first batch (its backend is up)."""
    sinks = [getattr(p, "sink", None) or getattr(p, "_sink", None) for p in plugins]
    return all(sink is not None and sink.stats["sent"] > 0 for sink in sinks)


def loggers(directory, every=10, mlflow_isolated=None):
    from corebus.integrations import MLflowLogger, TensorBoardLogger, WandbLogger

    mlflow_options = {} if mlflow_isolated is None else {"isolate_sdk": mlflow_isolated}
    return [
        TensorBoardLogger(log_dir=os.path.join(directory, "tb"), update_freq=every),
        MLflowLogger(
            tracking_uri=f"sqlite:///{directory}/mlflow.db",
            dir=os.path.join(directory, "mlflow"),
            log_every_n_steps=every,
            **mlflow_options,
        ),
        WandbLogger(mode="offline", dir=directory, log_every_n_steps=every),
    ]


def run(x, y, epochs, with_loggers, every=10, mlflow_isolated=None):
    sinks = loggers(tempfile.mkdtemp(prefix="corebus-bench-"), every, mlflow_isolated) if with_loggers else []
    clock = StepClock(warmup_epochs=epochs // 3, ready=lambda: delivered(sinks))
    trainer = corebus.Trainer(
        digits_mlp(),
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=[clock] + sinks,
        seed=0,
    )
    trainer.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    if clock.first is None:
        raise RuntimeError("the loggers were not up before the last epoch: run more --epochs")
    return clock.rate(), clock.ready_after


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--every", type=int, default=10, help="batch metrics every N steps (default 10)")
    parser.add_argument(
        "--isolation",
        action="store_true",
        help="add (c): MLflow's client in this process, (b) having it in a child process",
    )
    args = parser.parse_args(argv)
    x, y = load_data()
    variants = {
        "a_no_loggers": dict(with_loggers=False),
        "b_three_loggers": dict(with_loggers=True, mlflow_isolated=True if args.isolation else None),
    }
    if args.isolation:
        variants["c_mlflow_in_process"] = dict(with_loggers=True, mlflow_isolated=False)
    samples = {name: [] for name in variants}
    start_up = []
    for repeat in range(args.repeats):
        # ab, ba, ab...: a machine that drifts faster or slower favours no variant
        for name in list(variants) if repeat % 2 == 0 else list(variants)[::-1]:
            rate, ready_after = run(x, y, args.epochs, every=args.every, **variants[name])
            samples[name].append(rate)
            if name == "b_three_loggers":
                start_up.append(ready_after)
    median = {k: statistics.median(v) for k, v in samples.items()}
    for name, value in median.items():
        print(f"{name:<18}{value:>8.0f} steps/s   runs: {' '.join(f'{v:.0f}' for v in samples[name])}")
    pairs = [b / a for a, b in zip(samples["a_no_loggers"], samples["b_three_loggers"])]
    print(
        f"loggers / none = {median['b_three_loggers'] / median['a_no_loggers']:.3f}   "
        f"(median pair {statistics.median(pairs):.3f}; each repeat's pair: {' '.join(f'{r:.3f}' for r in pairs)})"
    )
    if args.isolation:
        child = [b / c for b, c in zip(samples["b_three_loggers"], samples["c_mlflow_in_process"])]
        print(
            f"MLflow client in a child / in this process = {statistics.median(child):.3f}   "
            f"(each repeat: {' '.join(f'{r:.3f}' for r in child)})"
        )
    print(
        f"loggers up (first batch delivered by all three) after {statistics.median(start_up):.1f} s of training "
        f"(runs: {' '.join(f'{v:.1f}' for v in start_up)})"
    )
    record(
        "loggers",
        f"TensorBoard + MLflow + W&B every {args.every} steps / no loggers",
        median["b_three_loggers"] / median["a_no_loggers"],
        ">= 0.95",
    )
    record(
        "loggers",
        "seconds of training until all three loggers delivered their first batch",
        statistics.median(start_up),
        unit="s",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
