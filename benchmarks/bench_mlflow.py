"""What logging every step to an MLflow server costs the training loop.

(a) ``Trainer.fit`` with no plugins
(b) ``Trainer.fit`` with ``MLflowLogger(log_every_n_steps=1)`` sending to a real ``mlflow
    server`` on 127.0.0.1 (sqlite store, the server's default worker count)
(c) the same with the default ``log_every_n_steps=10``
(a2) (a) again, between (b) and (c): a control, whose ratio to (a) is the noise floor of the
    machine the benchmark runs on (it read 0.978 and 1.046 in two 20-30-round runs here)

Digits MLP 64-256-256-10, batch 64, Adam, ``--epochs`` (29 steps each); ``--repeats`` rounds,
variants in alternating order (abc, cba, ...), ratios are medians of the per-round ratios to (a). Three rates:
steady state (what logging costs per step: from the first step after the logger's first delivery,
i.e. once its run exists on the server, and after the first third of the epochs, to the last
step, as ``bench_loggers``), the whole loop (adds the run's creation, a one-off cost paid mostly
by the server), and the whole ``fit`` (adds the final drain: last points, status).
Target for (b)/(a): >= 0.97.

Where (b)'s cost goes: the hook takes ~20 us per step on the training thread; the sink's worker
thread sends the points with ``MlflowClient.log_batch`` (protobuf messages, ~44 us of CPU per
point); the server, on the same cores, spends 100-200 us of CPU per metric point in its ORM
inserts, which a remote server would not take from training. ``--server-own-core``
runs the server on the last CPU and training on the others, in every variant, so the ratio is
the client's own cost; ``--server-nice 19`` keeps the shared cores but runs the server at the
lowest priority.
``--decompose`` adds two variants that split (b)'s cost: (d) a plugin whose ``on_log`` runs
every step and does nothing (the engine's per-step logging path), (e) a plugin that takes every
step's record in bulk and reads its values as the loggers do (``on_log_steps``, no sink).
Run: ``python benchmarks/bench_mlflow.py [--server-own-core | --server-nice 19] [--decompose]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_loggers import StepClock, delivered  # noqa: E402

import corebus  # noqa: E402
from corebus import Cadence, hookimpl  # noqa: E402
from corebus.demo import digits_mlp  # noqa: E402
from corebus.integrations import MLflowLogger  # noqa: E402
from corebus.kit import PendingPoints  # noqa: E402

from bench_engine import BATCH, load_data  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402
from results import record  # noqa: E402

NONE, EVERY_STEP, EVERY_10 = "(a) no loggers", "(b) MLflowLogger, every step", "(c) MLflowLogger, every 10"
CONTROL = "(a2) no loggers, again (control)"  # (a) again, next to (b) in every round


class LoopClock:
    """Notes when the training loop ends (before the loggers drain)."""

    @hookimpl(tryfirst=True)
    def on_train_end(self):
        self.loop_end = time.perf_counter()


class _Up:
    """Reported as delivered at once (``bench_loggers.delivered``) by the plugins without a sink."""

    stats = {"sent": 1}


class OnLogEveryStep:
    """(d): subscribed to every step's ``on_log``, doing nothing."""

    batch_log_cadence = Cadence.every_n(1)
    sink = _Up()

    @hookimpl
    def on_log(self, trainer, kind, step, logs):
        pass


class HoldAndRead:
    """(e): every step's record taken in bulk (``on_log_steps``) and its values read, as the
    loggers do, with no sink."""

    batch_log_cadence = Cadence.every_n(1)
    sink = _Up()

    def __init__(self):
        self.points = PendingPoints()
        self.read = 0

    @hookimpl
    def on_log_steps(self, records):
        for step in self.batch_log_cadence.picks(records):
            self.points.add(step.step, step.logs, step.time)
        self.read += len(self.points.take())


def run(x, y, epochs, plugins):
    """``(steps, steady-state steps/s, steps/s of the loop, steps/s of the fit)``.

    Steady state: from the first step after the logger's first delivery (its run exists on the
    server) and the first third of the epochs, to the last step; as in ``bench_loggers``.
    """
    clock, steady = LoopClock(), StepClock(warmup_epochs=epochs // 3, ready=lambda: delivered(plugins))
    trainer = corebus.Trainer(
        digits_mlp(),
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=[clock, steady, *plugins],
        seed=0,
    )
    start = time.perf_counter()
    trainer.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    end = time.perf_counter()
    steps = trainer.global_step
    steady_rate = steady.rate() if steady.first is not None else None
    return steps, (steady_rate, steps / (clock.loop_end - start), steps / (end - start))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--server-nice",
        type=int,
        default=0,
        help="run the server at this niceness (19: its CPU comes only from what training "
        "leaves, as a remote server's would not be taken from it at all)",
    )
    parser.add_argument(
        "--server-own-core",
        action="store_true",
        help="run the server on the last CPU and training on the others, as a server on "
        "another machine: the ratio is then the client's own cost",
    )
    parser.add_argument(
        "--decompose",
        action="store_true",
        help="add variants (d)-(e) that split the every-step cost (module docstring)",
    )
    args = parser.parse_args(argv)
    server_cpus = None
    if args.server_own_core:
        cpus = sorted(os.sched_getaffinity(0))
        server_cpus = {cpus[-1]}
        for thread_id in os.listdir("/proc/self/task"):  # every thread TensorFlow has started so far
            os.sched_setaffinity(int(thread_id), cpus[:-1])
    x, y = load_data()
    root = Path(tempfile.mkdtemp(prefix="corebus-bench-mlflow-"))
    server = MlflowServer(root, workers=None, niceness=args.server_nice, cpus=server_cpus)
    server.start()
    try:

        def logger(every):
            return MLflowLogger(
                tracking_uri=server.uri, experiment_name="bench", log_every_n_steps=every, dir=root / "spool"
            )

        run(x, y, 2, [])  # warm-up: tracing, the store's first writes, MLflow's lazy imports
        run(x, y, 2, [logger(1)])
        # CONTROL's ratio to (a) is what this machine's noise alone reads
        variants = {
            NONE: lambda: [],
            EVERY_STEP: lambda: [logger(1)],
            CONTROL: lambda: [],
            EVERY_10: lambda: [logger(10)],
        }
        if args.decompose:
            variants.update(
                {
                    "(d) on_log every step, doing nothing": lambda: [OnLogEveryStep()],
                    "(e) every step's record taken in bulk and read": lambda: [HoldAndRead()],
                }
            )
        rates = {name: [] for name in variants}
        sends = []
        for repeat in range(args.repeats):
            names = list(variants)
            # abc, cba, abc...: a machine that drifts faster or slower favours no variant
            for name in names if repeat % 2 == 0 else names[::-1]:
                gc.collect()  # the last run's garbage is not collected on this run's clock
                plugins = variants[name]()
                steps, variant_rates = run(x, y, args.epochs, plugins)
                if variant_rates[0] is None:
                    raise RuntimeError("the logger was not up before the last epoch: run more --epochs")
                rates[name].append(variant_rates)
                plugin = plugins[0] if plugins else None
                if isinstance(plugin, MLflowLogger):
                    stats = plugin.sink.stats
                    assert stats["sent"] == stats["queued"] and not stats["spooled"], stats  # all delivered live
                    if name == EVERY_STEP:
                        sends.append(
                            (stats["sends"] * variant_rates[1] / steps, stats["send_seconds"] / stats["sends"])
                        )
                elif isinstance(plugin, HoldAndRead):
                    assert plugin.read >= steps, plugin.read  # every step's values were read
    finally:
        server.stop()
    print(
        f"{steps} steps per run, {args.repeats} rounds; every step: {statistics.median(s for s, _ in sends):.1f} "
        f"MLflow sends/s, {statistics.median(t for _, t in sends) * 1e3:.0f} ms each"
    )
    base = rates[NONE]

    def per_round(name, i):
        return [r[i] / b[i] for r, b in zip(rates[name], base)]

    def bracketed(i):
        # (a) and (a2) sit on either side of (b) in every round (a b a2 c, c a2 b a)
        return statistics.median(2 * b[i] / (a[i] + a2[i]) for b, a, a2 in zip(rates[EVERY_STEP], base, rates[CONTROL]))

    for i, what in enumerate(
        (
            "steady state (the run exists, after 1/3 of the epochs)",
            "whole loop (+ run creation)",
            "whole fit (+ final drain)",
        )
    ):
        print(f"\n{what:<56}{'steps/s':>10}{'/ (a)':>8}   each round / (a)")
        for name, runs in rates.items():
            pairs = per_round(name, i)
            print(
                f"  {name:<54}{statistics.median(r[i] for r in runs):>10.0f}{statistics.median(pairs):>8.3f}   "
                + " ".join(f"{p:.3f}" for p in pairs)
            )
        print(f"  (b) / mean of (a) and (a2) in its round: {bracketed(i):.3f}")
    server_kind = (
        "a default-worker server"
        + (f" at nice {args.server_nice}" if args.server_nice else "")
        + (" on its own core" if args.server_own_core else "")
    )
    for i, what in ((0, "steady state"), (1, "whole loop")):
        for name, every in ((EVERY_STEP, 1), (EVERY_10, 10)):
            ratio = statistics.median(per_round(name, i))
            record(
                "mlflow",
                f"every {every} step{'s' if every > 1 else ''} to {server_kind} / none, {what}",
                ratio,
                ">= 0.97" if every == 1 else ">= 0.95",
            )
    record(
        "mlflow",
        f"control: no loggers / no loggers (the noise floor), steady state, beside {server_kind}",
        statistics.median(per_round(CONTROL, 0)),
    )
    record(
        "mlflow",
        f"every step to {server_kind} / mean of the two no-logger runs beside it, steady state",
        bracketed(0),
        ">= 0.97",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
