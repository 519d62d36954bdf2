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
    code = ("import sys\n"
            "for name in ('mlflow', 'wandb', 'matplotlib'): sys.modules[name] = None\n"
            "from corebus.cli import main\n"
            "code = main(['demo', '--epochs', '1'])\n"
            "assert 'tensorflow' not in sys.modules, 'the check comes before anything heavy'\n"
            "sys.exit(code)\n")
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
    trainer = corebus.Trainer(tiny_model(), "sgd", "sparse_categorical_crossentropy",
                              plugins=[SlowEpochEnd(), ("phase_clock", clock)], seed=0)
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
