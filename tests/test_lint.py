"""The lint and format check .ci/run runs (ruff, settings in pyproject.toml) pass, so `python -m pytest` shows a
finding before CI does."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    assert ruff, 'ruff is not installed: pip install -e ".[dev]"'
    done = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_check_passes():
    ruff = shutil.which("ruff")
    assert ruff, 'ruff is not installed: pip install -e ".[dev]"'
    done = subprocess.run(
        [ruff, "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, "run `ruff format .`\n" + done.stdout + done.stderr


def test_ci_runs_ruff():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "ruff check ." in lines and "ruff format --check ." in lines
