"""What the stall watchdog costs per step, and how fast a stall reaches a webhook.

Throughput: ``Trainer.fit`` on the digits MLP (64-256-256-10, batch 64, Adam; the helpers of
``bench_engine.py``), (a) without plugins, (b) with ``StallAlert()`` at its defaults (the
watchdog thread, the NaN / divergence check every 10 steps, throughput sampling), (c) with
the watchdog only. Variants run interleaved ``--repeats`` times; reported: median steps/s and
the median of the per-repeat ratios to (a).

Latency: a run with ``StallAlert(timeout=T)`` and an ``AlertWebhook`` posting to a real HTTP
receiver on 127.0.0.1; a plugin blocks the training thread at step 50 for T + 2 s. Latency is
the time from the start of the block to the receiver getting the POST (ideal: T).

Run: ``python benchmarks/bench_watchdog.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.demo import digits_mlp  # noqa: E402
from corebus.plugins import AlertWebhook, StallAlert  # noqa: E402

from bench_engine import BATCH, load_data, measure, trainer_fit  # noqa: E402
from results import record  # noqa: E402
from webhook_receiver import Receiver  # noqa: E402

VARIANTS = {
    "a_trainer": lambda x, y, e: trainer_fit(x, y, e),
    "b_stall_alert_defaults": lambda x, y, e: trainer_fit(x, y, e, [StallAlert()]),
    "c_watchdog_only": lambda x, y, e: trainer_fit(
        x, y, e, [StallAlert(check_every=None, throughput_drop=None, divergence_factor=None)]
    ),
}


class BlockAt:
    def __init__(self, step: int, seconds: float):
        self.step, self.seconds, self.started = step, seconds, None

    @hookimpl
    def on_train_batch_end(self, trainer):
        if trainer.global_step == self.step and self.started is None:
            self.started = time.time()
            time.sleep(self.seconds)


def alert_latency(x, y, timeout: float) -> float:
    with Receiver() as receiver:
        block = BlockAt(50, timeout + 2.0)
        plugins = [
            StallAlert(timeout=timeout, first_step_timeout=60),
            AlertWebhook(url=receiver.url, min_interval=0),
            block,
        ]
        trainer = corebus.Trainer(
            digits_mlp(), optimizer="adam", loss="sparse_categorical_crossentropy", plugins=plugins, seed=0
        )
        trainer.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
        stall = next(r for r in receiver.requests if r["json"]["text"].startswith("\U0001f6a8 *Training stalled"))
        return stall["time"] - block.started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=70, help="~29 steps per epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1.0, help="StallAlert timeout for the latency runs")
    parser.add_argument("--latency-runs", type=int, default=5)
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args(argv)
    x, y = load_data()
    samples = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, run in VARIANTS.items():
            samples[name].append(measure(run, x, y, args.epochs))
    median = {name: statistics.median(v) for name, v in samples.items()}
    base = samples["a_trainer"]
    ratios = {name: statistics.median(s / b for s, b in zip(v, base)) for name, v in samples.items()}
    print(f"{'variant':<26}{'steps/s':>10}{'/ (a)':>8}")
    for name in VARIANTS:
        print(f"{name:<26}{median[name]:>10.0f}{ratios[name]:>8.3f}")
    logging.getLogger("corebus").setLevel(logging.ERROR)  # the stall's stack dumps are not results
    latencies = [alert_latency(x, y, args.timeout) for _ in range(args.latency_runs)]
    print(
        f"stall alert latency, timeout {args.timeout:g} s (block start -> POST received): "
        f"median {statistics.median(latencies):.3f} s, max {max(latencies):.3f} s "
        f"({', '.join(f'{v:.3f}' for v in latencies)})"
    )
    record("watchdog", "StallAlert / none", ratios[list(VARIANTS)[1]], ">= 0.99")
    record(
        "watchdog",
        f"stall alert latency beyond timeout={args.timeout:g} s (median)",
        statistics.median(latencies) - args.timeout,
        "<= 1.0",
        unit="s",
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"steps_per_s": median, "samples": samples, "ratios": ratios, "latency_s": latencies}, fh, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
