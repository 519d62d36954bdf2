"""ray_train against a real local Ray cluster (ray.init(num_cpus=2) on 127.0.0.1): two Ray Train
workers run corebus.Trainer under MultiWorkerMirroredStrategy (Ray sets TF_CONFIG). Metrics and
checkpoints reach Ray's Result; a checkpoint restores the run; a run resumed from a finished
Result, and a run whose worker was killed with SIGKILL mid-epoch (Ray restarts the worker group),
end bit-identical to an uninterrupted run. An uninterrupted 3-epoch run is the oracle; its
storage_path is a bucket of a local S3 server (moto on 127.0.0.1), so every test reading its
checkpoints reads them back from object storage."""

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason='the ray extra: pip install "corebus[ray]"')
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import corebus  # noqa: E402
from corebus import hookimpl  # noqa: E402
from corebus.bus.registry import instantiate  # noqa: E402

pytestmark = pytest.mark.slow

EPOCHS = 3


class KillOnce:
    """SIGKILL this worker process once, at a global step, on one rank (a marker file makes it once)."""

    def __init__(self, rank, step, marker):
        self.rank, self.step, self.marker = rank, step, Path(marker)

    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer):
        import ray.train

        if (
            ray.train.get_context().get_world_rank() == self.rank
            and trainer.global_step >= self.step
            and not self.marker.exists()
        ):
            self.marker.write_text(str(trainer.global_step))
            os.kill(os.getpid(), signal.SIGKILL)


def train_loop(config):
    """One Ray Train worker: a small seeded MLP, 8 steps of 12 rows per epoch, 2 validation steps."""
    import keras
    import tensorflow as tf

    from corebus.testing import tiny_data

    tf.config.experimental.enable_op_determinism()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # a seeded global generator, as the test process has one: snapshots of both list the same variables
    tf.random.set_global_generator(tf.random.Generator.from_seed(0))
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3, activation="softmax")]
        )
        optimizer = keras.optimizers.Adam(0.01)  # Keras's TF optimizer keeps the strategy it was made under
    plugins = [
        {"name": "ray_train", "resume_from": config.get("resume")},
        {"name": "early_stopping", "monitor": "val_loss", "patience": 50, "min_delta": 1.0},
    ]
    if config.get("kill"):
        plugins.append(KillOnce(*config["kill"]))
    trainer = corebus.Trainer(
        model, optimizer, "sparse_categorical_crossentropy", ["accuracy"], plugins=plugins, strategy=strategy, seed=0
    )
    x, y = tiny_data(120)
    trainer.fit(x, y, batch_size=12, epochs=config["epochs"], validation_split=0.2, verbose=0, shuffle=True)


@pytest.fixture(scope="module")
def s3(s3):
    """The session's local S3 server (tests/conftest.py), its endpoint and keys in the environment
    the Ray workers inherit."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3.env.items():
            env.setenv(name, value)
        yield s3


@pytest.fixture(scope="module")
def cluster(s3):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the loop and its plugin travel by value: the workers do not have tests/ on their path
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def fit(storage, name, epochs, kill=None, resume=None, max_failures=0):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from corebus.integrations.ray import storage_config

    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config={"epochs": epochs, "kill": kill, "resume": resume},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=name, failure_config=FailureConfig(max_failures=max_failures), **storage_config(storage)
        ),
    )
    return trainer.fit()


def weights(result):
    from corebus.integrations.ray import load_snapshot

    snapshot = load_snapshot(result.checkpoint)
    return snapshot, [snapshot.arrays[k] for k in sorted(snapshot.arrays) if k.startswith(("model/", "optimizer."))]


@pytest.fixture(scope="module")
def uninterrupted(cluster, s3):
    return fit(f"s3://{s3.make_bucket()}/ray", "uninterrupted", EPOCHS)


def test_result_holds_last_epoch_logs_and_a_run_snapshot(uninterrupted, s3):
    # Ray kept the run and its checkpoints in the bucket: the checkpoint is read back from there
    assert uninterrupted.path.endswith("/ray/uninterrupted") and uninterrupted.checkpoint.path.startswith(
        uninterrupted.path
    )
    bucket = uninterrupted.path.split("/", 1)[0]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("/manifest.json") and "/checkpoint_" in k for k in keys)
    metrics = uninterrupted.metrics
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"):
        assert isinstance(metrics[key], float), key
    assert metrics["epoch"] == EPOCHS - 1 and metrics["step"] == EPOCHS * 8
    assert metrics["learning_rate"] == pytest.approx(0.01)
    snapshot, _ = weights(uninterrupted)
    assert snapshot.state["global_step"] == EPOCHS * 8 and snapshot.state["epoch"] == EPOCHS
    # every plugin's state travels: early stopping's counters of the last epoch
    assert snapshot.state["plugins"]["early_stopping"]["wait"] == EPOCHS - 1


def test_resume_from_a_finished_result_continues_exactly(uninterrupted, tmp_path):
    first = fit(tmp_path, "first", EPOCHS - 1)
    assert first.metrics["step"] == (EPOCHS - 1) * 8
    resumed = fit(tmp_path, "resumed", EPOCHS, resume=first.checkpoint)
    assert resumed.metrics["step"] == EPOCHS * 8 and resumed.metrics["epoch"] == EPOCHS - 1
    for got, want in zip(weights(resumed)[1], weights(uninterrupted)[1], strict=True):
        np.testing.assert_array_equal(got, want)  # bit-identical
    assert resumed.metrics["loss"] == uninterrupted.metrics["loss"]


def test_a_worker_killed_mid_epoch_is_restarted_and_resumes_exactly(uninterrupted, tmp_path):
    marker = tmp_path / "kill-marker.txt"
    # step 12 lies in the second epoch (steps 9-16): the group resumes from the first epoch's checkpoint
    result = fit(tmp_path, "killed", EPOCHS, kill=(1, 12, str(marker)), max_failures=1)
    assert marker.read_text() == "12", "the worker was not killed"
    assert result.error is None and result.metrics["step"] == EPOCHS * 8
    for got, want in zip(weights(result)[1], weights(uninterrupted)[1], strict=True):
        np.testing.assert_array_equal(got, want)  # bit-identical
    assert result.metrics["val_loss"] == uninterrupted.metrics["val_loss"]


def test_the_checkpoint_restores_into_a_run_outside_ray(uninterrupted, tmp_path):
    """Copied to a folder, the checkpoint is a backup_dir: the run ends restored, training nothing."""
    import keras

    snapshot, _ = weights(uninterrupted)
    backup_dir = uninterrupted.checkpoint.to_directory(str(tmp_path / "backup"))
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3, activation="softmax")]
    )
    trainer = corebus.Trainer(
        model,
        keras.optimizers.Adam(0.01),
        "sparse_categorical_crossentropy",
        ["accuracy"],
        plugins=[
            {"name": "early_stopping", "monitor": "val_loss", "patience": 50, "min_delta": 1.0},
            {"name": "backup", "backup_dir": backup_dir, "delete_checkpoint": False},
        ],
        seed=0,
    )
    from corebus.testing import tiny_data

    x, y = tiny_data(120)
    trainer.fit(x, y, batch_size=12, epochs=EPOCHS, validation_split=0.2, verbose=0)
    assert trainer.global_step == EPOCHS * 8
    for i, variable in enumerate(model.weights):
        np.testing.assert_array_equal(variable.numpy(), snapshot.arrays[f"model/{i}"])
    assert int(trainer.optimizer.iterations.numpy()) == EPOCHS * 8
    assert trainer.bus.plugins["early_stopping"].wait == EPOCHS - 1


def test_ray_train_outside_a_ray_worker_is_an_error_before_training():
    from corebus.testing import tiny_data, tiny_model

    trainer = corebus.Trainer(tiny_model(), "adam", "sparse_categorical_crossentropy", plugins=["ray_train"])
    x, y = tiny_data()
    with pytest.raises(corebus.ConfigError, match="only runs inside a Ray Train worker loop"):
        trainer.fit(x, y, epochs=1, verbose=0)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "params, match",
    [
        ({"checkpoint_every": 0}, "checkpoint_every=0"),
        ({"metrics": 3}, "metrics = 3"),
        ({"report_every_n_steps": -1}, "report_every_n_steps=-1"),
        ({"resume_from": "/nonexistent"}, "not a checkpoint directory"),
    ],
)
def test_bad_params_are_named(params, match):
    with pytest.raises(corebus.ConfigError, match=match):
        instantiate("ray_train", params)


CONFIG = """
[run]
name = "ray-run"
dir = "{dir}"

[model]
factory = "corebus.testing:tiny_model"

[data]
factory = "corebus.testing:tiny_data"
params = {{ n = 96 }}

[trainer]
optimizer = {{ name = "adam", learning_rate = 0.01 }}
loss = "sparse_categorical_crossentropy"
seed = 0

[fit]
epochs = 2
batch_size = 12
verbose = 0

[[plugins]]
name = "csv_logger"
filename = "history.csv"
"""


def corebus_run(*args, env=None):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "corebus", "run", *args], capture_output=True, text=True, timeout=500, env=env
    )


def test_corebus_run_print_plan_shows_the_scaling_config(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(dir=tmp_path))
    done = corebus_run(str(config), "--workers", "2", "--print-plan")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ScalingConfig(num_workers=2" in done.stdout and "a local Ray cluster" in done.stdout
    assert "ray_train" in done.stdout and not (tmp_path / "ray-run" / "ray").exists()


@pytest.mark.parametrize("problem", ["missing bucket", "refused credentials"])
def test_corebus_run_unwritable_storage_path_is_one_clear_error_before_ray_starts(tmp_path, s3, problem):
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(dir=tmp_path))
    env = {**os.environ}
    if problem == "missing bucket":
        url, expected = "s3://no-such-bucket-here/ray", "the bucket 'no-such-bucket-here' does not exist"
        done = corebus_run(str(config), "--workers", "2", "--storage-path", url, env=env)
    else:
        url, expected = f"s3://{s3.make_bucket()}/ray", "refused the credentials"
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-Secret-0123456789"
        with s3.checking_credentials():
            done = corebus_run(str(config), "--workers", "2", "--storage-path", url, env=env)
        assert env["AWS_SECRET_ACCESS_KEY"] not in done.stderr
    assert done.returncode == 2 and expected in done.stderr and "--storage-path" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Started a local Ray instance" not in done.stderr


def test_storage_config_checks_the_store_before_training(s3):
    from corebus import ConfigError
    from corebus.integrations.ray import storage_config

    with pytest.raises(ConfigError, match="Ray storage_path: 's3://no-such-bucket-here/r'.*aws s3 mb"):
        storage_config("s3://no-such-bucket-here/r")


def test_corebus_run_unreachable_address_is_one_clear_error(tmp_path):
    import socket

    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(dir=tmp_path))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = corebus_run(str(config), "--workers", "2", "--address", f"127.0.0.1:{port}")
    assert done.returncode == 2 and "no Ray cluster answers there" in done.stderr and "ray start --head" in done.stderr
    assert "Traceback" not in done.stderr


def test_corebus_run_workers_trains_the_config_on_ray(tmp_path, cluster, s3):
    """On this module's cluster (--address: no second cluster to start), with Ray's storage in a
    bucket (--storage-path s3://...); the CSV is written once, by the chief."""
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(dir=tmp_path))
    bucket = s3.make_bucket()
    address = ray.get_runtime_context().gcs_address
    done = corebus_run(str(config), "--workers", "2", "--address", address, "--storage-path", f"s3://{bucket}/ray")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final epoch:" in done.stdout and "val_loss" not in done.stdout
    rows = (tmp_path / "ray-run" / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch")  # header + 2 epochs, not 2 x 2
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("ray/ray-run/checkpoint_") and k.endswith("/manifest.json") for k in keys)
    assert not (tmp_path / "ray-run" / "ray").exists()
