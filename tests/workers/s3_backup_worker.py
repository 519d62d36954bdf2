"""A training run that keeps its run snapshots on object storage (run as a subprocess).

    python s3_backup_worker.py OUT_DIR BACKUP_URL [--hang-in-upload K]

Trains a tiny model with ``BackupAndRestore(BACKUP_URL, save_freq=5)`` and writes the final
weights to OUT_DIR/final.npz and the step it resumed from to OUT_DIR/process.json.
``--hang-in-upload K``: during the K-th snapshot's upload, once its first object is stored and
before the rest, the process prints ``MID-UPLOAD <step>`` and waits, for the test to SIGKILL it
there. The credentials and the endpoint come from the environment (AWS_*), as in production.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import corebus  # noqa: E402
from corebus.delivery import storage  # noqa: E402
from corebus.plugins import BackupAndRestore  # noqa: E402
from corebus.testing import tiny_data  # noqa: E402

EPOCHS, BATCH, SAVE_FREQ = 3, 16, 5


def hang_in_upload(k: int) -> None:
    """Stop the K-th snapshot's upload after its first object (the test kills the process there)."""
    real_upload = storage.upload
    seen: list[str] = []

    def upload(local, url):
        real_upload(local, url)
        snapshot = url.rsplit("/", 2)[-2]
        if snapshot not in seen:
            seen.append(snapshot)
        if len(seen) == k and url.endswith("arrays.npz"):
            print(f"MID-UPLOAD {snapshot}", flush=True)
            time.sleep(600)

    storage.upload = upload


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("url")
    parser.add_argument("--hang-in-upload", type=int)
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()
    if args.hang_in_upload:
        hang_in_upload(args.hang_in_upload)
    x, y = tiny_data(n=256)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    backup = BackupAndRestore(args.url, save_freq=SAVE_FREQ)
    trainer = corebus.Trainer(
        model,
        optimizer=keras.optimizers.Adam(0.02),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=[backup],
        seed=0,
    )
    trainer.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(args.out) / "final.npz", *trainer.model.get_weights())
    Path(args.out, "process.json").write_text(json.dumps({"restored_step": backup.restored_step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
