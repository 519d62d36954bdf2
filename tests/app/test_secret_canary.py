"""Secret canaries: a config run (``corebus run``, a real subprocess) with a password in the
MLflow tracking URI (a real ``mlflow server``; plain servers do not check it, the URL carries
it), a token in the webhook URL's query (a real HTTP receiver that answers the first alert with
503, so a retry is logged) and a ``${CANARY_VAR}`` value (an MLflow tag and a W&B tag), plus an
MLflow logger whose server is down (send-failure warnings and a spool). Then every byte the run
wrote (run directory: CSV, checkpoints, snapshots, TensorBoard, report, spools, alert log, W&B
offline run; the working directory; the MLflow server's store and artifacts) and its console
output, and that of ``--print-plan``, are searched: no canary may appear."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_server import free_port, mlflow_server  # noqa: F401  (module fixture: one server)
from webhook_receiver import Receiver

PASSWORD, TOKEN, VAR_VALUE = "CANARYPASS1", "CANARYTOKEN2", "CANARYVAR3"
CANARIES = (PASSWORD, TOKEN, VAR_VALUE)

CONFIG = """
[run]
name = "canary"
dir = "{runs}"

[model]
factory = "corebus.testing:tiny_model"

[data]
factory = "corebus.testing:tiny_data"

[trainer]
optimizer = "sgd"
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
seed = 0

[fit]
epochs = 3
batch_size = 16
validation_split = 0.25
verbose = 1

[[plugins]]
name = "csv_logger"
filename = "history.csv"

[[plugins]]
name = "checkpoint"
filepath = "checkpoints/{{epoch:02d}}.keras"

[[plugins]]
name = "backup"
backup_dir = "backup"
delete_checkpoint = false

[[plugins]]
name = "tensorboard"
log_dir = "tensorboard"
hparams = true

[[plugins]]
name = "mlflow"
tracking_uri = "http://user:{password}@127.0.0.1:{port}"
experiment_name = "canary"
dir = "mlflow"
log_every_n_steps = 1
tags = {{ deploy_key = "${{CANARY_VAR}}" }}

[[plugins]]
name = "mlflow"
tracking_uri = "http://user:{password}@127.0.0.1:{dead_port}"
experiment_name = "canary-outage"
dir = "mlflow-outage"
shutdown_timeout = 2.0

[[plugins]]
name = "wandb"
dir = "wandb"
tags = ["${{CANARY_VAR}}"]

[[plugins]]
name = "stall_alert"
patience = 1
min_delta = 100.0

[[plugins]]
name = "alert_log"
path = "alerts.jsonl"

[[plugins]]
name = "alert_webhook"
url = "http://127.0.0.1:{webhook_port}/hooks/alerts?token={token}"
format = "json"
min_interval = 0

[[plugins]]
name = "report"
report_dir = "report"
"""


@pytest.fixture(scope="module")
def canary_run(mlflow_server, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("canary")
    config_dir, work = root / "config", root / "work"  # the config holds secrets as written: not an output
    config_dir.mkdir()
    work.mkdir()
    env = {
        **os.environ,
        "CANARY_VAR": VAR_VALUE,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(work / "wandb-env"),
        "PYTHONUNBUFFERED": "1",
    }
    with Receiver(answers=[503]) as receiver:
        config = config_dir / "canary.toml"
        config.write_text(
            CONFIG.format(
                runs=work / "runs",
                password=PASSWORD,
                port=mlflow_server.port,
                dead_port=free_port(),
                webhook_port=receiver.server.server_address[1],
                token=TOKEN,
            )
        )
        command = [sys.executable, "-m", "corebus", "run", str(config)]
        plan = subprocess.run(command + ["--print-plan"], cwd=work, env=env, capture_output=True, timeout=300)
        run = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=600)
        requests = list(receiver.requests)
    assert plan.returncode == 0, plan.stderr.decode(errors="replace")[-3000:]
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    return {"work": work, "server": mlflow_server, "plan": plan, "run": run, "requests": requests}


def hits(*roots):
    """``{canary: [files holding it]}`` over every file under ``roots``, byte by byte."""
    found = {canary: [] for canary in CANARIES}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for canary in CANARIES:
                    if canary.encode() in data:
                        found[canary].append(str(path))
    return found


def test_the_canaries_were_used(canary_run):
    """Not vacuous: each secret reached its backend, and every output exists."""
    work, server = canary_run["work"], canary_run["server"]
    assert any(f"token={TOKEN}" in r["path"] for r in canary_run["requests"])  # the alert went out...
    assert [r["status"] for r in canary_run["requests"]][:2] == [503, 200]  # ...after a retry
    client = server.client()
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("canary").experiment_id])
    assert mlflow_run.info.status == "FINISHED" and "loss" in mlflow_run.data.metrics
    assert mlflow_run.data.tags["deploy_key"]  # the ${CANARY_VAR} tag exists (its value: see below)
    run_dir = work / "runs" / "canary"
    for expected in ("history.csv", "alerts.jsonl", "report/report.json", "checkpoints/03.keras"):
        assert (run_dir / expected).is_file(), expected
    assert list((run_dir / "mlflow-outage").glob("*.spool.jsonl"))  # the dead server's records
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").rglob("*.wandb")) and list((run_dir / "backup").rglob("state.json"))
    stderr = canary_run["run"].stderr.decode(errors="replace")
    assert "send failed" in stderr and "spooled in" in stderr  # the warnings that once printed the URI


def test_no_canary_on_the_console(canary_run):
    for name in ("plan", "run"):
        text = (canary_run[name].stdout + canary_run[name].stderr).decode(errors="replace")
        assert [c for c in CANARIES if c in text] == [], name
    assert "user:***@127.0.0.1" in canary_run["plan"].stdout.decode()  # hidden, not dropped


def test_no_canary_in_any_file_the_run_wrote(canary_run):
    # the run directory and the working directory it ran in (nothing may go to ./mlruns, ./wandb)
    assert hits(canary_run["work"]) == {canary: [] for canary in CANARIES}


def test_no_url_password_or_token_in_the_mlflow_store(canary_run):
    found = hits(canary_run["server"].root)
    assert (found[PASSWORD], found[TOKEN]) == ([], [])


def test_no_var_value_in_the_mlflow_store(canary_run):
    assert hits(canary_run["server"].root)[VAR_VALUE] == []
