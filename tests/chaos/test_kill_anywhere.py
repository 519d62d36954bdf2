"""Kill anywhere, resume, and every logger still holds each point exactly once.

Real training processes (``tests/workers/chaos_worker.py``: backup, checkpoint, csv_logger,
TensorBoard, MLflow on a local sqlite store, W&B offline, the run report) are killed with
SIGKILL at seeded random points (a step, the middle of a snapshot write, an epoch end, right
after an epoch's record reached the loggers, validation, the end phase), then rerun until they
finish. Each finished run is compared with an uninterrupted one: identical weights, and per
logger the points read back from disk (CSV rows, raw TensorBoard events, MLflow's sqlite
metrics, the W&B ``.wandb`` files, ``report.json``): 0 missing, 0 duplicated, same values.

One difference is expected and allowed: a step's own accuracy is derived from two running
means (``corebus/engine/trainer.py`` ``_step_logs``), so the first step a resumed process trains has
no step before it and logs the running mean (docs/failure-and-recovery.md).
``benchmarks/soak.py`` runs hundreds of such kills.
"""

from __future__ import annotations

import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chaos_support import check_run, read_all, run_chain, run_worker  # noqa: E402

SEED = int(os.environ.get("COREBUS_CHAOS_SEED", "28"))
# Five kills in CI (each chain runs beside the other, the uninterrupted run before the shorter);
# a kill at a plain step is the soak's (benchmarks/soak.py), as is every mix of these.
CHAINS = {
    "write_epoch_log_epoch_end": ["write", "epoch_log", "epoch_end"],
    "validation_train_end": ["validation", "train_end"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill_anywhere")

    def go(name):
        if name == "uninterrupted":
            return name, {"last": run_worker(tmp / name), "kills": []}
        return name, run_chain(tmp / name, CHAINS[name], random.Random(f"{SEED}-{name}"))

    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at a time, as tests/engine/test_resume.py
        done = dict(pool.map(go, ["uninterrupted", *CHAINS]))
    for name, run in done.items():
        assert run["last"].returncode == 0, f"{name}: {run['last'].stderr[-3000:]}"
    reference = read_all(tmp / "uninterrupted")
    return {
        name: dict(run, out=tmp / name, check=check_run(tmp / name, tmp / "uninterrupted", reference))
        for name, run in done.items()
        if name != "uninterrupted"
    }


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_the_kills_happened_and_the_weights_are_the_uninterrupted_runs(runs, chain):
    run = runs[chain]
    print(chain, "killed at", run["kills"])
    assert len(run["kills"]) >= 2, run["kills"]  # the seeded points were reached (a run may end before the last)
    assert run["check"]["identical_weights"]


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "report"])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_each_point_is_logged_exactly_once(runs, chain, logger):
    result = runs[chain]["check"][logger]
    assert result == {"missing": 0, "duplicated": 0, "differing": []}, (runs[chain]["kills"], result)
    if logger == "wandb":
        assert runs[chain]["check"]["wandb_run_ids"] == 1  # the resumed processes continued its run


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_each_mlflow_point_is_logged_exactly_once_in_one_finished_run(runs, chain):
    check = runs[chain]["check"]
    assert check["mlflow_statuses"] == ["FINISHED"]
    assert check["mlflow"] == {"missing": 0, "duplicated": 0, "differing": []}, (runs[chain]["kills"], check["mlflow"])
