"""The command line, run as a user runs it."""

import json
import subprocess
import sys


def run(*args, timeout=300, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "corebus", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def test_plugins_listing_does_not_import_tensorflow():
    code = (
        "import sys, json, io, contextlib\n"
        "from corebus.app.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out): main(['plugins', '--json'])\n"
        "assert 'tensorflow' not in sys.modules, 'listing imported tensorflow'\n"
        "print(out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["progress"]["distribution"] == "corebus"
    assert "on_train_batch_end" in plugins["progress"]["hooks"]
    table = run("plugins")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["name", "distribution", "version"]


def test_demo_trains_with_the_plugin_stack_and_prints_a_summary(tmp_path):
    result = run("demo", "--epochs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Epoch 3/3" in out and "Summary" in out and "learning_rate" in out
    for name in (
        "lr_schedule",
        "reduce_lr_on_plateau",
        "gradient_clipping",
        "early_stopping",
        "checkpoint",
        "csv_logger",
        "backup",
        "progress",
    ):
        assert name in out.split("Epoch 1/3")[0], f"{name} missing from the hook plan"
    assert "training speed: " in out and "(validation, checkpoints, report, loggers)" in out
    accuracy = float(out.split("test: ")[1].split("accuracy=")[1].split()[0])
    assert accuracy > 0.8, out  # digits is easy: 3 epochs of an MLP reach > 80 %
    (run_dir,) = (tmp_path / "corebus-runs").iterdir()
    assert len(list((run_dir / "checkpoints").glob("epoch*.weights.h5"))) == 3
    assert (run_dir / "checkpoints" / "last.weights.h5").exists()
    assert len((run_dir / "history.csv").read_text().splitlines()) == 4
    assert not list((run_dir / "backup").glob("snapshot-*"))  # removed after a clean finish
