"""Config runs check every value before anything runs: types against the plugins' and factories'
signatures, Keras identifiers during --print-plan, [run] name/dir used, local factories importable."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corebus import ConfigError
from corebus.app.cli import main as cli_main
from corebus.app.config import load_run_config

BASE = """
[model]
factory = "corebus.testing:tiny_model"
{model}
[data]
factory = "corebus.testing:tiny_data"
params = {{ n = 64 }}

[trainer]
optimizer = {optimizer}
loss = "{loss}"
metrics = {metrics}

[fit]
epochs = 1
batch_size = 16
verbose = 0
{extra}
"""


def write(
    tmp_path,
    name="run.toml",
    model="",
    optimizer='"sgd"',
    loss="sparse_categorical_crossentropy",
    metrics='["accuracy"]',
    extra="",
):
    path = tmp_path / name
    path.write_text(BASE.format(model=model, optimizer=optimizer, loss=loss, metrics=metrics, extra=extra))
    return path


def fails(path, capsys, *parts):
    """The CLI refuses the file with one line naming it: no traceback."""
    assert cli_main(["run", str(path), "--print-plan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"corebus run: {path}: ") and "Traceback" not in err and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    return err


def test_a_string_is_not_a_bool_for_a_plugin_param(tmp_path, capsys):
    path = write(tmp_path, extra='[[plugins]]\nname = "early_stopping"\nrestore_best_weights = "false"\n')
    fails(path, capsys, "plugins[0] (early_stopping)", "restore_best_weights = 'false': expected bool")


@pytest.mark.parametrize(
    "params, message",
    [
        ('patience = "3"', "patience = '3': expected int"),
        ("min_delta = true", "min_delta = True: expected float"),
        ("baseline = [1]", "baseline = [1]: expected float | None"),
    ],
)
def test_every_plugin_value_is_checked_against_its_hint(tmp_path, capsys, params, message):
    fails(write(tmp_path, extra=f'[[plugins]]\nname = "early_stopping"\n{params}\n'), capsys, message)


def test_lists_fit_tuple_hints_and_ints_fit_float_hints(tmp_path):
    path = write(tmp_path, extra='[[plugins]]\nname = "tensorboard"\nprofile_batch = [2, 3]\nshutdown_timeout = 5\n')
    ((_, plugin),) = load_run_config(path).plugins
    assert plugin.shutdown_timeout == 5


def test_a_misspelled_loss_fails_print_plan_naming_close_matches(tmp_path, capsys):
    path = write(tmp_path, loss="sparse_categorical_crossentropi")
    fails(
        path, capsys, "trainer.loss = 'sparse_categorical_crossentropi'", "did you mean sparse_categorical_crossentropy"
    )


def test_a_misspelled_metric_and_optimizer_fail_print_plan(tmp_path, capsys):
    fails(write(tmp_path, metrics='["accuracy", "auc_roc"]'), capsys, "trainer.metrics[1] = 'auc_roc'", "no metric")
    fails(write(tmp_path, optimizer='"adamm"'), capsys, "trainer.optimizer = 'adamm'", "did you mean")


def test_an_unknown_optimizer_param_names_the_allowed_ones(tmp_path, capsys):
    path = write(tmp_path, optimizer='{ name = "adam", lr = 0.002 }')
    fails(
        path,
        capsys,
        "trainer.optimizer.lr: Adam has no such parameter (did you mean learning_rate?)",
        "allowed: name, learning_rate, beta_1",
    )
    fails(write(tmp_path, optimizer='{ name = "adam", learning_rate = "fast" }'), capsys, "trainer.optimizer = ")


def test_a_misspelled_factory_param_names_the_factory_and_its_params(tmp_path, capsys):
    fails(
        write(tmp_path, model="params = { hiden = 16 }"),
        capsys,
        "model.params.hiden: corebus.testing:tiny_model has no such parameter (did you mean hidden?)",
        "allowed: features (int), classes (int), seed (int), hidden (int)",
    )
    fails(write(tmp_path, model='params = { hidden = "16" }'), capsys, "model.params.hidden = '16': expected int")


def test_run_name_and_dir_keep_runs_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        extra='[run]\ndir = "runs"\n\n[[plugins]]\nname = "csv_logger"\nfilename = "history.csv"\n'
        '\n[[plugins]]\nname = "report"\n',
    )
    for name in ("first", "second"):
        assert cli_main(["run", str(path), "--set", f"run.name={name}"]) == 0
    for name in ("first", "second"):
        assert (tmp_path / "runs" / name / "report" / "report.json").exists()
        assert (tmp_path / "runs" / name / "history.csv").read_text().count("\n") == 2
    assert not (tmp_path / "corebus-runs").exists()  # the report's default folder is not used
    assert cli_main(["run", str(path), "--print-plan"]) == 0  # no name: the file's name
    assert f"run directory {'runs/run'}" in capsys.readouterr().out
    fails(write(tmp_path, extra='[run]\nname = "a/b"\n'), capsys, "run.name = 'a/b': expected a folder name")


def test_factory_modules_beside_the_config_and_in_the_current_folder_import_without_pythonpath(tmp_path):
    """The ``corebus`` command (unlike ``python -m``) puts neither folder on sys.path by itself."""
    (tmp_path / "project").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "project" / "mymodel.py").write_text(
        textwrap.dedent("""
        from corebus.testing import tiny_model

        def build(hidden: int = 8):
            return tiny_model(hidden=hidden)
    """)
    )
    (tmp_path / "configs" / "mydata.py").write_text("from corebus.testing import tiny_data as load\n")
    text = write(tmp_path).read_text().replace('"corebus.testing:tiny_model"', '"mymodel:build"')
    (tmp_path / "configs" / "run.toml").write_text(text.replace('"corebus.testing:tiny_data"', '"mydata:load"'))
    command = str(Path(sys.executable).parent / "corebus")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [command, "run", "../configs/run.toml", "--print-plan"],
        cwd=tmp_path / "project",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mymodel:build" in result.stdout and "mydata:load" in result.stdout


def test_a_plugin_mapping_in_python_is_type_checked_too():
    from corebus.bus.registry import resolve_all

    with pytest.raises(ConfigError, match=r"restore_best_weights = 'false': expected bool"):
        resolve_all([{"name": "early_stopping", "restore_best_weights": "false"}])
