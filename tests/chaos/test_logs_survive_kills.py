"""What a user reads survives a kill: real training processes killed with SIGKILL and rerun.

The worker is ``tests/workers/resume_worker.py`` (bit-deterministic CPU training), so the
killed-and-resumed run's files are compared byte for byte with an uninterrupted run's.
"""

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).parents[1] / "workers" / "resume_worker.py"


def run_worker(out, *args, timeout=600):
    return subprocess.run(
        [sys.executable, str(WORKER), str(out), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")

    def go(job):
        name, kill_args = job
        out = tmp / name
        killed = run_worker(out, *kill_args) if kill_args else None
        return name, (killed, run_worker(out), out)

    jobs = [
        ("uninterrupted", []),
        ("kill_60", ["--kill-at-step", "60"]),
        # the 13th snapshot is step 48's, taken after epoch 3's row: the row outlives it
        ("kill_writing_48", ["--kill-during-write", "13"]),
        ("kill_in_train_end", ["--kill-in-train-end"]),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(go, jobs))


def finished(runs, name):
    killed, resumed, out = runs[name]
    if killed is not None:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out


def restored_step(out):
    return json.loads((out / "process.json").read_text())["restored_step"]


@pytest.mark.slow
def test_csv_keeps_the_rows_before_the_resume_point(runs):
    reference = (finished(runs, "uninterrupted") / "history.csv").read_bytes()
    rows = reference.decode().splitlines()
    assert rows[0].startswith("epoch,") and [r.split(",")[0] for r in rows[1:]] == [str(e) for e in range(6)]
    out = finished(runs, "kill_60")
    assert restored_step(out) in (50, 55)  # save_freq 5; step 60's snapshot was not taken
    assert (out / "history.csv").read_bytes() == reference


@pytest.mark.slow
def test_csv_rows_written_after_the_snapshot_are_written_once(runs):
    out = finished(runs, "kill_writing_48")
    assert restored_step(out) == 45  # epoch 3's row (step 48) was on disk, its snapshot was not
    assert (out / "history.csv").read_bytes() == (finished(runs, "uninterrupted") / "history.csv").read_bytes()


@pytest.mark.slow
def test_a_kill_in_the_end_phase_trains_nothing_again(runs):
    """A plugin's on_train_end kills the process after every epoch was trained: the snapshots
    are still there (the end is a commit), so the rerun only ends the run."""
    reference = finished(runs, "uninterrupted")
    out = finished(runs, "kill_in_train_end")
    assert json.loads((out / "process.json").read_text()) == {"steps": 0, "restored_step": 72}
    assert (out / "history.csv").read_bytes() == (reference / "history.csv").read_bytes()
    weights, ref_weights = np.load(out / "final.npz"), np.load(reference / "final.npz")
    assert sorted(weights.files) == sorted(ref_weights.files)
    for key in weights.files:
        np.testing.assert_array_equal(weights[key], ref_weights[key])
    assert not (out / "backup").exists()  # the rerun committed the end: no snapshot, no directory
