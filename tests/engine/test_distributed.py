"""tf.distribute: MirroredStrategy on two logical CPU devices and MultiWorkerMirroredStrategy with
two worker processes on 127.0.0.1, each a real subprocess (the device layout and TF_CONFIG must
be set before TensorFlow starts). The single-device run on the same global batches is the oracle."""

import json
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parents[1] / "workers" / "distributed_worker.py"


def launch(out, mode, *args, rank=0, ports=""):
    command = [sys.executable, str(WORKER), str(out), "--mode", mode, "--rank", str(rank), "--ports", ports, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, expect=0):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == expect, output[-3000:]
    return output


def result(out, rank=0):
    arrays = np.load(Path(out) / f"rank{rank}.npz")
    return [arrays[f"arr_{i}"] for i in range(len(arrays.files))], json.loads(Path(out, f"rank{rank}.json").read_text())


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ",".join(map(str, ports))


def cluster(out, *args):
    ports = free_ports(2)
    workers = [launch(out, "multiworker", *args, rank=rank, ports=ports) for rank in (0, 1)]
    for worker in workers:
        finish(worker)
    return result(out, 0), result(out, 1)


def mlflow_runs(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dist")
    return client, client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The oracles, run once: one device, early stopping as in the cluster runs."""
    root = tmp_path_factory.mktemp("single")
    runs = {"plain": [], "early": ["--es-min-delta", "0.2"]}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda item: finish(launch(root / item[0], "single", *item[1])), runs.items()))
    return {name: result(root / name) for name in runs}


def test_mirrored_strategy_on_two_devices_matches_one_device(tmp_path, single):
    finish(launch(tmp_path, "mirrored"))
    (weights, info), (expected, expected_info) = result(tmp_path), single["plain"]
    assert info["num_replicas"] == 2 and info["is_chief"] and info["global_step"] == expected_info["global_step"] == 48
    for ours, theirs in zip(weights, expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    for key, values in expected_info["history"].items():  # logs reduced across the replicas
        np.testing.assert_allclose(info["history"][key], values, rtol=1e-5)


def test_two_workers_train_alike_log_once_and_stop_together(tmp_path, single):
    (weights0, info0), (weights1, info1) = cluster(tmp_path, "--es-min-delta", "0.2")
    expected, expected_info = single["early"]
    # identical weights on both workers, and the single-device result
    for ours, theirs, oracle in zip(weights0, weights1, expected):
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_allclose(ours, oracle, rtol=1e-5, atol=1e-6)
    # early stopping ran on both and stopped both at the single-device epoch
    assert info0["epochs"] == info1["epochs"] == expected_info["epochs"] and len(expected_info["epochs"]) < 6
    assert "early_stopping" in info0["plugins"] and "early_stopping" in info1["plugins"]
    # writers and loggers on the chief only: one set of checkpoints, one MLflow run
    assert (info0["is_chief"], info1["is_chief"]) == (True, False) and info0["num_workers"] == 2
    assert {"checkpoint", "mlflow"} <= set(info0["plugins"]) and not {"checkpoint", "mlflow"} & set(info1["plugins"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        f"ep{e + 1:02d}.weights.h5" for e in info0["epochs"]
    ]
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = client.get_metric_history(runs[0].info.run_id, "epoch/val_loss")
    np.testing.assert_allclose([m.value for m in sorted(logged, key=lambda m: m.step)], info0["history"]["val_loss"])


def test_a_stop_decided_on_one_worker_stops_every_worker(tmp_path):
    (weights0, info0), (weights1, info1) = cluster(tmp_path, "--stop-rank", "1", "--stop-epoch", "2")
    assert info0["epochs"] == info1["epochs"] == [0, 1, 2]
    assert info0["global_step"] == info1["global_step"] == 24
    for ours, theirs in zip(weights0, weights1):
        np.testing.assert_array_equal(ours, theirs)


def test_sigterm_on_one_worker_stops_every_worker_at_one_agreed_step(tmp_path):
    ports = free_ports(2)
    workers = [
        launch(tmp_path, "multiworker", "--signal-rank", "1", "--signal-epoch", "1", rank=rank, ports=ports)
        for rank in (0, 1)
    ]
    for worker in workers:
        finish(worker, expect=128 + signal.SIGTERM)  # the signalled worker and the other alike
    stopped = [json.loads((tmp_path / f"rank{rank}-stopped.json").read_text()) for rank in (0, 1)]
    assert stopped[0] == stopped[1] == {"exception": "Preempted", "global_step": 16, "epochs": [0, 1]}


def test_mirrored_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = launch(whole, "mirrored", "--backup")
    first = launch(killed, "mirrored", "--backup", "--kill-at-step", "20")
    finish(uninterrupted)
    finish(first, expect=-signal.SIGKILL)
    assert not (killed / "rank0.npz").exists() and list((killed / "backup").glob("snapshot-*"))
    finish(launch(killed, "mirrored", "--backup"))
    (weights, info), (expected, expected_info) = result(killed), result(whole)
    assert info["global_step"] == expected_info["global_step"] == 48
    for ours, theirs in zip(weights, expected):
        np.testing.assert_array_equal(ours, theirs)
