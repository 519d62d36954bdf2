"""The command line, run as a user runs it."""

import json
import subprocess
import sys


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "corebus", *args], capture_output=True, text=True, timeout=timeout)


def test_plugins_listing_does_not_import_tensorflow():
    code = (
        "import sys, json, io, contextlib\n"
        "from corebus.cli import main\n"
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


def test_demo_trains_and_prints_a_summary():
    result = run("demo", "--epochs", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Epoch 3/3" in out and "Summary" in out
    accuracy = float(out.split("test: ")[1].split("accuracy=")[1].split()[0])
    assert accuracy > 0.8, out  # digits is easy: 3 epochs of an MLP reach > 80 %
