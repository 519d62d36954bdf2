"""``corebus run config.toml``: a typed schema checked before anything runs, ${VAR} secrets never
echoed, the same run as the equivalent Python."""

import json
import subprocess
import sys

import pytest

import corebus
from corebus import ConfigError
from corebus.app.cli import main as cli_main
from corebus.app.config import load_run_config

SECRET = "https://hooks.slack.com/services/T000/B000/run-config-secret"

CONFIG = """
[model]
factory = "corebus.testing:tiny_model"

[data]
factory = "corebus.testing:tiny_data"
params = {{ n = 96 }}

[trainer]
optimizer = {{ name = "sgd", learning_rate = 0.1 }}
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
seed = 0

[fit]
epochs = 3
batch_size = 16
validation_split = 0.25
shuffle = false
verbose = 0
{extra}
[[plugins]]
name = "early_stopping"
monitor = "val_loss"
patience = 5

[[plugins]]
name = "alert_webhook"
url = "${{TEST_ALERT_URL}}"
format = "slack"

[[plugins]]
name = "csv_logger"
filename = "{csv}"
"""


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_ALERT_URL", SECRET)

    def write(extra="", suffix=".toml", text=None):
        path = tmp_path / f"run{suffix}"
        path.write_text(text if text is not None else CONFIG.format(extra=extra, csv=tmp_path / "history.csv"))
        return path

    return write


def test_a_config_run_equals_the_same_run_in_python(config, tmp_path, capsys):
    assert cli_main(["run", str(config())]) == 0
    assert "final epoch:" in capsys.readouterr().out
    from_config = (tmp_path / "history.csv").read_text()
    import keras

    from corebus.testing import tiny_data, tiny_model

    x, y = tiny_data(96)
    trainer = corebus.Trainer(
        tiny_model(),
        keras.optimizers.SGD(0.1),
        "sparse_categorical_crossentropy",
        ["accuracy"],
        plugins=[{"name": "csv_logger", "filename": str(tmp_path / "python.csv")}],
        seed=0,
    )
    trainer.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, shuffle=False, verbose=0)
    assert (tmp_path / "python.csv").read_text() == from_config and from_config.count("\n") == 4


def test_print_plan_validates_and_shows_the_plan_without_training_or_the_secret(config, tmp_path, capsys):
    assert cli_main(["run", str(config()), "--print-plan"]) == 0
    out = capsys.readouterr().out
    assert "plugin alert_webhook(url='${TEST_ALERT_URL}', format='slack')" in out
    assert "on_epoch_end" in out and "early_stopping" in out
    assert SECRET not in out and not (tmp_path / "history.csv").exists()


def test_an_interpolated_secret_is_redacted_from_run_params(config):
    run = load_run_config(config())
    trainer, fit = run.build()
    params = json.dumps(trainer._make_bus(["history"]) and trainer.run_params())
    assert SECRET not in params and "alert_webhook" in params


@pytest.mark.parametrize(
    "extra, message",
    [
        ("epochs_typo = 3\n", "fit.epochs_typo: unknown key; allowed: epochs, batch_size"),
        ("[extra]\n", "unknown section 'extra'; allowed: model, data, trainer, fit, run, plugins"),
    ],
)
def test_unknown_keys_and_sections_name_what_is_allowed(config, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(config(extra=extra))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"fit.epochs": "ten"}, "fit.epochs = 'ten': expected an integer >= 0"),
        ({"fit.verbose": 5}, "fit.verbose = 5: expected 0, 1 or 2"),
        ({"fit.shuffle": 1}, "fit.shuffle = 1: expected bool"),
        (
            {"trainer.mixed_precision": "fp8"},
            'trainer.mixed_precision = \'fp8\': expected "mixed_float16" or "mixed_bfloat16"',
        ),
        (
            {"model.factory": "corebus.testing.tiny_model"},
            "model.factory = 'corebus.testing.tiny_model': write \"module:function\"",
        ),
        ({"data.factory": "no_such_module:f"}, "data.factory = 'no_such_module:f': cannot import 'no_such_module'"),
        ({"data.factory": "corebus.testing:nothing"}, "corebus.testing has no callable 'nothing'"),
    ],
)
def test_bad_values_fail_with_file_key_and_allowed_values(config, override, message):
    path = config()
    with pytest.raises(ConfigError) as error:
        load_run_config(path, override)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_plugin_errors_name_the_entry_and_never_show_the_secret(config, tmp_path):
    text = CONFIG.format(extra="", csv=tmp_path / "h.csv").replace('format = "slack"', 'format = "pager"')
    with pytest.raises(ConfigError) as error:
        load_run_config(config(text=text))
    assert "plugins[1] (alert_webhook)" in str(error.value) and "pager" in str(error.value)
    assert SECRET not in str(error.value)
    with pytest.raises(ConfigError, match=r"plugins\[0\] \(early_stopping\).*unexpected keyword argument 'patiense'"):
        load_run_config(config(text=CONFIG.format(extra="", csv="x.csv").replace("patience", "patiense")))
    with pytest.raises(ConfigError, match="unknown plugin 'no_such_plugin'"):
        load_run_config(config(text=CONFIG.format(extra="", csv="x.csv").replace('"csv_logger"', '"no_such_plugin"')))


def test_a_missing_variable_and_a_broken_file_are_one_clear_error(config, monkeypatch, capsys):
    monkeypatch.delenv("TEST_ALERT_URL")
    assert cli_main(["run", str(config())]) == 2
    assert "plugins[1].url uses ${TEST_ALERT_URL}, which is not set in the environment" in capsys.readouterr().err
    assert cli_main(["run", str(config(text="[model\nfactory = 1"))]) == 2
    assert "does not parse" in capsys.readouterr().err


def test_yaml_configs_and_set_overrides(config, tmp_path, capsys):
    yaml_text = f"""
model: {{factory: "corebus.testing:tiny_model"}}
data: {{factory: "corebus.testing:tiny_data"}}
trainer: {{optimizer: sgd, loss: sparse_categorical_crossentropy, seed: 0}}
fit: {{epochs: 5, batch_size: 32, verbose: 0}}
plugins:
  - name: csv_logger
    filename: "{tmp_path / "yaml.csv"}"
"""
    path = config(text=yaml_text, suffix=".yaml")
    assert cli_main(["run", str(path), "--set", "fit.epochs=2"]) == 0
    assert (tmp_path / "yaml.csv").read_text().count("\n") == 3  # header + the 2 epochs of the override


@pytest.mark.slow
def test_the_corebus_command_runs_a_config(config):
    result = subprocess.run(
        [sys.executable, "-m", "corebus", "run", str(config()), "--set", "fit.epochs=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final epoch: accuracy=" in result.stdout


def test_the_example_config_in_the_repository_validates(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "run_config.toml"
    monkeypatch.chdir(tmp_path)  # its relative paths land here
    assert cli_main(["run", str(example), "--print-plan"]) == 0
    out = capsys.readouterr().out
    for name in ("lr_schedule", "early_stopping", "checkpoint", "stall_alert", "alert_log", "report"):
        assert f"plugin {name}(" in out
    assert cli_main(["run", str(example), "--set", "fit.epochs=1", "--set", "fit.verbose=0"]) == 0
    assert (tmp_path / "corebus-runs" / "config-run" / "report" / "report.html").exists()
