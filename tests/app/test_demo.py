"""The demo: missing extras named all at once, an honest time summary, test metrics apart."""

import re
import subprocess
import sys
import time

import corebus
from corebus import hookimpl
from corebus.demo import PhaseClock
from corebus.testing import tiny_data, tiny_model


def test_a_demo_without_the_extras_names_every_missing_one_and_the_one_pip_command(tmp_path):
    # the packages are hidden, not uninstalled: an import of a module set to None in sys.modules fails
    code = (
        "import sys\n"
        "for name in ('mlflow', 'wandb', 'matplotlib'): sys.modules[name] = None\n"
        "from corebus.app.cli import main\n"
        "code = main(['demo', '--epochs', '1'])\n"
        "assert 'tensorflow' not in sys.modules, 'the check comes before anything heavy'\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "extras mlflow, wandb, report, which are not installed" in result.stderr
    assert 'pip install "corebus[mlflow,wandb,report]"' in result.stderr
    assert not (tmp_path / "corebus-runs").exists()


class SlowEpochEnd:
    """Epoch-end work of a known length, as checkpoints and loggers are."""

    @hookimpl
    def on_epoch_end(self, epoch):
        time.sleep(0.3)


def test_the_summary_reports_training_speed_apart_from_epoch_end_work():
    x, y = tiny_data(256)
    clock = PhaseClock()
    trainer = corebus.Trainer(
        tiny_model(), "sgd", "sparse_categorical_crossentropy", plugins=[SlowEpochEnd(), ("phase_clock", clock)], seed=0
    )
    started = time.perf_counter()
    trainer.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0)
    seconds = time.perf_counter() - started
    assert [n for n, _ in clock.epochs] == [12, 12, 12]
    time_line, speed_line = clock.lines(seconds, started)
    numbers = [float(v) for v in re.findall(r"([\d.]+)s", time_line)]
    total, training, epoch_end, start = numbers
    assert total == round(seconds, 1) and abs(training + epoch_end + start - total) <= 0.15
    assert epoch_end >= 0.9  # three sleeps of 0.3 s: never counted as training
    assert training < total - 0.9
    speed = float(speed_line.split("training speed: ")[1].split()[0])
    later = clock.epochs[1:]
    assert speed == round(sum(n for n, _ in later) / sum(t for _, t in later))
    assert speed > 36 / seconds  # the old summary's steps / total time understated it
    assert "(36 steps; measured over the epochs after the first" in speed_line


def test_the_demo_logs_its_test_evaluation_as_test_keys_beside_the_last_validation_point(tmp_path):
    import mlflow
    from tensorboard.backend.event_processing import event_accumulator

    from corebus.demo import TestEvaluation

    x, y = tiny_data(160)
    x_test, y_test = tiny_data(40, seed=1)
    test = TestEvaluation(x_test, y_test)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plugins = [
        {"name": "early_stopping", "monitor": "val_loss", "patience": 1, "restore_best_weights": True},
        ("test_evaluation", test),
        {"name": "tensorboard", "log_dir": str(tmp_path / "tb")},
        {"name": "mlflow", "tracking_uri": uri, "experiment_name": "demo-test", "dir": str(tmp_path / "spool")},
        {"name": "report", "report_dir": str(tmp_path / "report")},
    ]
    trainer = corebus.Trainer(
        tiny_model(), "sgd", "sparse_categorical_crossentropy", ["accuracy"], plugins=plugins, seed=0
    )
    history = trainer.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0)
    # Keras on the same weights is the oracle of the values
    expected = trainer.model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    assert test.results.keys() == {"loss", "accuracy"}
    assert all(abs(test.results[k] - expected[k]) < 1e-6 for k in expected), (test.results, expected)

    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo-test").experiment_id])
    metric = {k: [m.value for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    assert metric["epoch/val_loss"] == [__import__("pytest").approx(v) for v in history.history["val_loss"]]
    assert metric["epoch/test_loss"] == [__import__("pytest").approx(test.results["loss"])]

    validation = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "validation"))
    validation.Reload()
    tags = validation.Tags()["tensors"]
    assert not [tag for tag in tags if "test" in tag]
    # one evaluation point per validation of the fit (as Keras's TensorBoard writes), none for the test set
    assert len(validation.Tensors("evaluation_loss_vs_iterations")) == len(history.epoch)
    train = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "train"))
    train.Reload()
    assert "epoch_test_loss" in train.Tags()["tensors"]

    import json

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["epochs"]) == len(history.epoch)  # the test record is no epoch of the report
