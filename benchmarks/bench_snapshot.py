"""Step-time inflation from run snapshots of a ~10M-parameter model.

Trains the same MLP (~10.5M parameters, Adam: ~31M floats of state per snapshot) three ways in
one process, interleaved, median of ``--repeats``:

(a) no backup plugin
(b) ``BackupAndRestore(save_freq=N, background=True)``  -- capture on the training thread,
    write (npz + sha256 + fsync + rename) on a background thread, at most one in flight
(c) ``BackupAndRestore(save_freq=N, background=False)`` -- for reference
(d) ``BackupAndRestore("s3://bucket/run", save_freq=N, background=True)`` -- the snapshot staged
    locally and uploaded, manifest last, to a local S3 server (moto's server mode on 127.0.0.1,
    started here; ``--no-s3`` leaves it out)

Run: ``python benchmarks/bench_snapshot.py`` (the S3 line needs ``pip install "corebus[s3,dev]"``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import corebus  # noqa: E402
from corebus.plugins import BackupAndRestore  # noqa: E402

from results import record  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def big_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((512,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def run(x, y, steps, plugins):
    trainer = corebus.Trainer(
        big_model(), optimizer="adam", loss="sparse_categorical_crossentropy", plugins=plugins, seed=0
    )
    trainer.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0)  # trace outside the timing
    start = time.perf_counter()
    trainer.fit(x, y, batch_size=64, epochs=2, verbose=0, initial_epoch=1)
    return steps / (time.perf_counter() - start), trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-freq", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="leave out the local S3 server line")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * args.steps, 512)).astype("float32")
    y = rng.integers(0, 10, size=64 * args.steps).astype("int32")
    params = big_model().count_params()
    results = {"a_no_backup": [], "b_background": [], "c_blocking": []}
    server = None
    if not args.no_s3:
        import s3_server

        server = s3_server.start()
        os.environ.update(server.env)
        bucket = server.make_bucket()
        results["d_s3_background"] = []
    try:
        for _ in range(args.repeats):
            for name in results:
                directory = tempfile.mkdtemp(prefix="corebus-bench-")
                target = f"s3://{bucket}/run" if name == "d_s3_background" else directory
                plugins = (
                    []
                    if name == "a_no_backup"
                    else [BackupAndRestore(target, save_freq=args.save_freq, background=name != "c_blocking")]
                )
                speed, _ = run(x, y, args.steps, plugins)
                results[name].append(speed)
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    median = {k: statistics.median(v) for k, v in results.items()}
    base = median["a_no_backup"]
    print(f"model: {params / 1e6:.1f}M parameters; snapshot every {args.save_freq} steps; {args.steps} steps per run")
    for name, value in median.items():
        print(f"{name:<16}{value:>8.1f} steps/s   step-time inflation {base / value - 1:+.1%}")
    record(
        "snapshot",
        "step-time inflation, background snapshot every 50 steps",
        base / median["b_background"] - 1,
        unit="fraction",
    )
    record(
        "snapshot",
        "step-time inflation, blocking snapshot every 50 steps",
        base / median["c_blocking"] - 1,
        unit="fraction",
    )
    if "d_s3_background" in median:
        record(
            "snapshot",
            "step-time inflation, background snapshot to the local S3 server every 50 steps",
            base / median["d_s3_background"] - 1,
            unit="fraction",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
