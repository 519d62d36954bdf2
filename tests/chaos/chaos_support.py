"""Read every logger's points back from disk, and compare two runs point by point.

A *point* is ``(series, step) -> value``; a reader returns each point's values as a list, so a
point written twice shows as two values. Used by ``test_kill_anywhere.py`` and
``benchmarks/soak.py``. Wall times (timestamps, ``steps_per_second``) are left out: a run cut
in two takes longer.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))
from wandb_reader import read_run, run_files  # noqa: E402

Points = dict[tuple[str, int], list[Any]]
LOGGERS = ("csv", "tensorboard", "mlflow", "wandb", "report")
WALL_TIME = ("steps_per_second",)


def _wall(name: str) -> bool:
    return any(word in name for word in WALL_TIME)


def csv_points(out: Path) -> Points:
    points: Points = defaultdict(list)
    path = out / "history.csv"
    if path.exists():
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for column, value in row.items():
                    if column != "epoch":
                        points[(column, int(row["epoch"]))].append(value)
    return dict(points)


def tensorboard_points(out: Path) -> Points:
    """Every value of every event file under ``out/tb`` (scalars, text, graphs), as written:
    raw events, not TensorBoard's reader, which hides a repeated step by purging."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points: Points = defaultdict(list)
    for path in sorted((out / "tb").glob("*/events.out.tfevents.*")):
        run = path.parent.name
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("graph_def"):
                points[(f"{run}/graph", event.step)].append("graph")  # its bytes vary (attribute order)
            for value in event.summary.value:
                tensor = value.tensor
                read = (
                    tensor.float_val[0]
                    if tensor.float_val
                    else tensor.double_val[0]
                    if tensor.double_val
                    else b"".join(tensor.string_val).decode(errors="replace")
                )
                if isinstance(read, str):  # text (checkpoint paths, run params) names the run's folder
                    read = read.replace(str(out), "OUT")
                if value.metadata.plugin_data.plugin_name in ("graphs", "graph_keras_model"):
                    read = "graph"  # its bytes vary from process to process (attribute order)
                points[(f"{run}/{value.tag}", event.step)].append(read)
    return dict(points)


def mlflow_points(out: Path) -> tuple[Points, list[str]]:
    """The metric points of every run in the store, and the runs' statuses."""
    points: Points = defaultdict(list)
    db = out / "mlflow.db"
    if not db.exists():
        return {}, []
    with sqlite3.connect(db) as connection:
        statuses = [status for (status,) in connection.execute("select status from runs")]
        for key, step, value in connection.execute("select key, step, value from metrics order by step, timestamp"):
            if not _wall(key):
                points[(key, step)].append(value)
    return dict(points), statuses


def wandb_points(out: Path) -> tuple[Points, set[str]]:
    """The history of every ``.wandb`` file under ``out/wandb`` (a resumed offline run writes
    one more file with the same run id), and the run ids seen."""
    points: Points = defaultdict(list)
    ids = set()
    for path in run_files(out):
        run = read_run(path, wait=0.5)
        ids.add(run.run_id)
        for row in run.history:
            for key, value in row.items():
                if not key.startswith("_") and not _wall(key):
                    points[(key, row["_step"])].append(value)
    return dict(points), ids


def report_points(out: Path) -> Points:
    points: Points = defaultdict(list)
    path = out / "report" / "report.json"
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    for record in report["epochs"]:
        for key, value in record["logs"].items():
            if not _wall(key):
                points[(f"epoch/{key}", record["epoch"])].append((record["step"], value))
    batches = report["batches"]
    for index, step in enumerate(batches["step"]):
        for key, column in batches["values"].items():
            points[(f"batch/{key}", step)].append(column[index])
    for event in report["checkpoints"]:
        points[("checkpoint", event["step"])].append((Path(event["filepath"]).name, event["kept"]))
    return dict(points)


def read_all(out: Path) -> dict[str, Any]:
    """``{logger: points}`` plus ``mlflow_statuses`` and ``wandb_run_ids``."""
    mlflow, statuses = mlflow_points(out)
    wandb, ids = wandb_points(out)
    return {
        "csv": csv_points(out),
        "tensorboard": tensorboard_points(out),
        "mlflow": mlflow,
        "wandb": wandb,
        "report": report_points(out),
        "mlflow_statuses": statuses,
        "wandb_run_ids": ids,
    }


def is_batch_accuracy(logger: str, series: str) -> bool:
    """A step's own accuracy: derived from two running means (corebus/engine/trainer.py ``_step_logs``),
    so the first step a resumed process trains has no step before it and logs the running mean."""
    return series in {
        "tensorboard": ("train/batch_accuracy",),
        "mlflow": ("accuracy",),
        "wandb": ("batch/accuracy",),
        "report": ("batch/accuracy",),
    }.get(logger, ())


def compare(logger: str, reference: Points, ours: Points, resumed_at: set[int]) -> dict[str, Any]:
    """Missing and duplicated points of ``ours`` against ``reference``; values that differ
    (other than a resumed process's first derived batch accuracy, at a step in ``resumed_at``+1)."""
    missing = duplicated = 0
    differing = []
    for key in set(reference) | set(ours):
        want, got = reference.get(key, []), ours.get(key, [])
        missing += max(0, len(want) - len(got))
        duplicated += max(0, len(got) - len(want))
        if want and got and got[: len(want)] != want[: len(got)]:
            series, step = key
            if not (is_batch_accuracy(logger, series) and step - 1 in resumed_at):
                differing.append((key, str(want)[:200], str(got)[:200]))
    return {"missing": missing, "duplicated": duplicated, "differing": sorted(differing, key=str)[:10]}


# ---------------------------------------------------------------- runs of the chaos worker

WORKER = Path(__file__).parents[1] / "workers" / "chaos_worker.py"
STEPS_PER_EPOCH, EPOCHS = 12, 5
KINDS = ("step", "write", "epoch_end", "epoch_log", "validation", "train_end")


def run_worker(out: Path, kill: str | None = None, timeout: float = 600) -> Any:
    import subprocess

    command = [sys.executable, str(WORKER), str(out)] + (["--kill", kill] if kill else [])
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def processes(out: Path) -> list[dict[str, Any]]:
    path = out / "process.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plan_kill(kind: str, reached: int, rng: Any) -> str | None:
    """Where to kill the next process of a run that reached global step ``reached``: a point it
    has surely not passed yet (``None`` when there is none left)."""
    last = STEPS_PER_EPOCH * EPOCHS
    epoch = reached // STEPS_PER_EPOCH  # its end (and validation) is after step `reached`
    if kind == "step":
        return f"step:{rng.randint(reached + 1, last - 1)}" if reached + 1 < last else None
    if kind == "write":
        return f"write:{rng.randint(1, 3)}"
    if kind in ("epoch_end", "epoch_log", "validation"):
        return f"{kind}:{rng.randint(epoch, EPOCHS - 1)}" if epoch < EPOCHS else None
    if kind == "train_end":
        return "train_end"
    raise ValueError(kind)


def run_chain(out: Path, kinds: list[str], rng: Any) -> dict[str, Any]:
    """Start the run killed at each of ``kinds`` in turn (where is drawn from ``rng``), then
    rerun it until it finishes. Returns the kills made and every process's record."""
    import signal

    kills, reached = [], 0
    for kind in kinds:
        where = plan_kill(kind, reached, rng)
        if where is None:
            continue
        done = run_worker(out, where)
        if done.returncode == 0:  # the run finished before reaching the kill: nothing to resume
            return {"kills": kills, "processes": processes(out), "last": done}
        if done.returncode != -signal.SIGKILL:
            raise AssertionError(f"{where}: exit {done.returncode}\n{done.stderr[-3000:]}")
        kills.append(where)
        reached = max(reached, processes(out)[-1]["killed_at_step"])
    done = run_worker(out)
    return {"kills": kills, "processes": processes(out), "last": done}


def check_run(out: Path, reference_out: Path, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """A finished killed-and-resumed run against the uninterrupted one: identical weights,
    and per logger the missing / duplicated / differing points."""
    import numpy as np

    reference = reference or read_all(reference_out)
    ours = read_all(out)
    weights, ref_weights = np.load(out / "final.npz"), np.load(reference_out / "final.npz")
    identical = sorted(weights.files) == sorted(ref_weights.files) and all(
        np.array_equal(weights[k], ref_weights[k]) for k in ref_weights.files
    )
    resumed_at = {p["restored_step"] for p in processes(out) if p.get("restored_step") is not None}
    result = {
        "identical_weights": identical,
        "mlflow_statuses": ours["mlflow_statuses"],
        "wandb_run_ids": len(ours["wandb_run_ids"]),
    }
    for logger in LOGGERS:
        result[logger] = compare(logger, reference[logger], ours[logger], resumed_at)
    return result
