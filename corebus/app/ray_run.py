"""``corebus run CONFIG --workers N [--address ADDR]``: a run config on Ray Train.

Ray places the workers (a local cluster when no address is given), sets TF_CONFIG on each, and
restarts the worker group after a failure; every worker builds the config's model under
``MultiWorkerMirroredStrategy`` and trains with the ``ray_train`` plugin, so epoch logs and run
snapshots reach Ray and a restarted group resumes at the exact step. Ray is imported only here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from corebus.delivery.io import check_writable
from corebus.delivery.storage import arrow_filesystem, is_remote
from corebus.errors import ConfigError, require_module

WHAT = "corebus run --workers"


def scaling_plan(workers: int, address: str | None, storage: Path | str) -> str:
    """What ``--print-plan`` shows of the Ray side of the run."""
    where = f"the Ray cluster at {address}" if address else f"a local Ray cluster (ray.init(num_cpus={workers}))"
    return "\n".join(
        [
            f"ray: TensorflowTrainer on {where}",
            f"  ScalingConfig(num_workers={workers}, use_gpu=False, resources_per_worker={{'CPU': 1}})",
            "  each worker: MultiWorkerMirroredStrategy (TF_CONFIG set by Ray), the config's model built in its scope",
            f"  RunConfig(storage_path={str(storage)!r}); FailureConfig(max_failures=0): "
            "rerun with the same name to resume",
            "  plugins: ray_train added (epoch metrics, run-snapshot checkpoints); loggers write from the chief only",
        ]
    )


def _ray_overrides(config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    # Workers may start in another folder: every relative path is taken from the driver's.
    return {**overrides, "run.dir": str(config.run_dir.parent.resolve())}


def run_on_ray(
    path: str,
    overrides: dict[str, Any],
    workers: int,
    address: str | None,
    print_plan: bool,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Train the config on ``workers`` Ray Train workers; returns the last epoch's metrics.

    ``storage_path``: where Ray keeps results and checkpoints (default ``<run dir>/ray``); a
    storage URL such as ``s3://bucket/runs`` is checked for writes before Ray starts."""
    from corebus.app.config import describe_config, load_run_config
    from corebus.bus.registry import instantiate

    if workers < 1:
        raise ConfigError(f"--workers {workers}: give a number of workers >= 1")
    config = load_run_config(path, overrides)  # every error in the file before Ray starts
    storage = storage_path if is_remote(storage_path) else Path(storage_path or config.run_dir / "ray").resolve()
    if print_plan:
        if not any(name == "ray_train" for name, _ in config.plugins):
            config.plugins.append(("ray_train", instantiate("ray_train", {})))
        trainer, fit = config.build()
        print(describe_config(config))
        print(scaling_plan(workers, address, storage))
        print(trainer.describe(verbose=fit.get("verbose", 1)))
        return {}
    instantiate("ray_train", {})  # the [ray] extra, named before anything starts
    check_writable(storage, "--storage-path")  # a missing bucket or refused credentials: before Ray starts
    ray = require_module("ray", extra="ray", what=WHAT)
    train = require_module("ray.train", extra="ray", what=WHAT)
    tensorflow_train = require_module("ray.train.tensorflow", extra="ray", what=WHAT)
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=workers, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"--address {address}: no Ray cluster there ({type(exc).__name__}: {exc}); start one "
            "with `ray start --head` and pass its address, or leave --address out for a local "
            "cluster"
        ) from None
    try:
        trainer = tensorflow_train.TensorflowTrainer(
            _worker_loop,
            train_loop_config={"config": str(Path(path).resolve()), "overrides": _ray_overrides(config, overrides)},
            scaling_config=train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=train.RunConfig(name=config.run_dir.name, **_storage(storage)),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    return dict(result.metrics or {})


def _storage(storage: Path | str) -> dict[str, Any]:
    """RunConfig's storage arguments: a store URL reaches Ray through corebus's fsspec layer."""
    if isinstance(storage, str):
        filesystem, path = arrow_filesystem(storage)
        return {"storage_path": path, "storage_filesystem": filesystem}
    return {"storage_path": str(storage)}


def _check_reachable(address: str) -> None:
    """A host:port that answers, before ray.init (which waits long on a dead address)."""
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return  # Ray resolves these itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there ({exc}); start one with `ray start "
            "--head` and pass its address, or leave --address out for a local cluster"
        ) from None


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the config's run under MultiWorkerMirroredStrategy, with ray_train."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from corebus.app.config import load_run_config
    from corebus.bus.registry import instantiate

    # First: the strategy configures TensorFlow's collectives, which must precede any TF op
    # (checking the config resolves Keras identifiers, which starts TensorFlow).
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    config = load_run_config(loop_config["config"], loop_config["overrides"])
    config.sections["trainer"]["strategy"] = strategy
    if not any(name == "ray_train" for name, _ in config.plugins):
        config.plugins.append(("ray_train", instantiate("ray_train", {})))
    with strategy.scope():  # the model and the optimizer are made under the strategy
        trainer, fit = config.build()
    trainer.fit(**fit)
