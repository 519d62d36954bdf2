"""Two workers under Ray Train beside two workers launched by hand with TF_CONFIG.

Both variants train the same digits MLP (the data tiled 8 times: 112 steps an epoch) with
``corebus.Trainer(strategy=MultiWorkerMirroredStrategy())``, global batch 128, on 127.0.0.1.

(a) by hand: two processes of this script, each given TF_CONFIG
(b) Ray Train: ``TensorflowTrainer`` with 2 workers on a local cluster (``ray.init(num_cpus=2)``),
    the ``ray_train`` plugin active (each epoch reported to Ray with a snapshot checkpoint: what
    a user runs)

Measured on the chief: steps/s after the first epoch (tracing and the collective's set-up are
not steady state) and start-up seconds, from the launch (the processes started, or
``TensorflowTrainer.fit()`` called) to the first epoch's begin. Target: (b)/(a) >= 0.9.
Run: ``python benchmarks/bench_ray.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GLOBAL_BATCH = 128


def train(epochs: int, launched: float, plugins: list) -> dict:
    """One worker's run; returns the chief's clock readings."""
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    import corebus
    from corebus.demo import digits_mlp

    digits = load_digits()
    x = np.tile((digits.data / 16.0).astype("float32"), (8, 1))
    y = np.tile(digits.target.astype("int32"), 8)

    class EpochClock:
        def __init__(self):
            self.begins, self.ends = [], []

        @corebus.hookimpl
        def on_epoch_begin(self):
            self.begins.append(time.time())

        @corebus.hookimpl
        def on_epoch_end(self):
            self.ends.append(time.time())

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = digits_mlp()
    clock = EpochClock()
    trainer = corebus.Trainer(
        model,
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        strategy=strategy,
        seed=0,
        plugins=[clock, *plugins],
    )
    trainer.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs, verbose=0, shuffle=False)
    steps_per_epoch = trainer.global_step // epochs
    steady = (steps_per_epoch * (epochs - 1)) / (clock.ends[-1] - clock.ends[0])
    return {"startup_s": clock.begins[0] - launched, "steps_per_s": steady, "steps": trainer.global_step}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def by_hand(epochs: int, out: Path) -> dict:
    ports = ",".join(map(str, free_ports(2)))
    launched = time.time()
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), "--ports", ports, "--epochs", str(epochs)]
            + ["--launched", repr(launched), "--out", str(out)]
        )
        for rank in (0, 1)
    ]
    for worker in workers:
        if worker.wait(timeout=600):
            raise RuntimeError(f"a hand-launched worker failed (exit {worker.returncode})")
    return json.loads(out.read_text())


def under_ray(epochs: int, storage: Path) -> dict:
    import ray.train as ray_train
    from ray.train.tensorflow import TensorflowTrainer

    def loop(config):
        result = train(config["epochs"], config["launched"], ["ray_train"])
        if ray_train.get_context().get_world_rank() == 0:
            Path(config["out"]).write_text(json.dumps(result))

    out = storage / "chief.json"
    launched = time.time()
    TensorflowTrainer(
        loop,
        train_loop_config={"epochs": epochs, "launched": launched, "out": str(out)},
        scaling_config=ray_train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray_train.RunConfig(name=f"bench-{launched:.0f}", storage_path=str(storage)),
    ).fit()
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="112 steps per epoch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.worker is not None:  # one hand-launched worker: TF_CONFIG before TensorFlow starts
        workers = [f"127.0.0.1:{port}" for port in args.ports.split(",")]
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": args.worker}}
        )
        result = train(args.epochs, args.launched, [])
        if args.worker == 0:
            Path(args.out).write_text(json.dumps(result))
        return 0

    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    import ray

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results import record

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {"(a) by hand, TF_CONFIG": [], "(b) Ray Train": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]  # the machine drifts
                for name in order:
                    where = Path(tmp) / f"{repeat}-{name[1]}"
                    where.mkdir()
                    if name.startswith("(a)"):
                        runs[name].append(by_hand(args.epochs, where / "chief.json"))
                    else:
                        runs[name].append(under_ray(args.epochs, where))
    finally:
        ray.shutdown()

    print(f"2 workers, MultiWorkerMirroredStrategy on 127.0.0.1, global batch {GLOBAL_BATCH}, {args.repeats} rounds")
    print(f"{'variant':<26}{'steps/s':>10}{'start-up s':>12}")
    for name, results in runs.items():
        rate = statistics.median([r["steps_per_s"] for r in results])
        print(f"{name:<26}{rate:>10.0f}{statistics.median([r['startup_s'] for r in results]):>12.1f}")
    ratios = [b["steps_per_s"] / a["steps_per_s"] for a, b in zip(*runs.values())]
    record(
        "ray",
        "2 workers under Ray Train / by hand with TF_CONFIG, steps/s after epoch 1",
        statistics.median(ratios),
        ">= 0.9",
    )
    for name, results in runs.items():
        record("ray", f"start-up {name[4:]}", statistics.median([r["startup_s"] for r in results]), unit="s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
