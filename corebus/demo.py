"""``corebus demo``: the digits dataset (bundled with scikit-learn), the engine, the plugins."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import time
from pathlib import Path

from corebus.bus.bus import hookimpl
from corebus.errors import ConfigError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEMO_EXTRAS = ("tensorboard", "mlflow", "wandb", "report")  # the optional parts the demo's stack uses


def missing_extras(extras: tuple[str, ...] = DEMO_EXTRAS) -> list[str]:
    """The extras among ``extras`` with a package that does not import, read from corebus's own
    requirements (``matplotlib>=3.5; extra == "report"``), without importing any of them."""
    missing = []
    for requirement in importlib.metadata.requires("corebus") or []:
        marker = re.search(r"""extra\s*==\s*["']([\w-]+)["']""", requirement)
        if marker is None or marker.group(1) not in extras or marker.group(1) in missing:
            continue
        module = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).replace("-", "_").lower()
        if importlib.util.find_spec(module) is None:
            missing.append(marker.group(1))
    return sorted(missing, key=extras.index)


def check_demo_extras() -> None:
    """One error naming every missing extra and the one pip command, before anything is built."""
    missing = missing_extras()
    if missing:
        raise ConfigError(
            f"the demo's plugin stack needs the optional extras {', '.join(missing)}, which are not installed. "
            f'Install them with: pip install "corebus[{",".join(missing)}]"   (or "corebus[all]")'
        )


class TestEvaluation:
    """Evaluates the test set when training ends, after early stopping restored the best weights
    and before the loggers close, and logs it as ``test_*`` keys: an evaluation after fit would
    reach the loggers as one more validation point."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y
        self.results: dict[str, float] = {}

    @hookimpl
    def on_train_end(self, trainer) -> None:
        self.results = {
            k: float(v) for k, v in trainer.model.evaluate(self.x, self.y, verbose=0, return_dict=True).items()
        }
        # the report keeps epochs: this record is no epoch of its own
        reports = [p for p in trainer.bus.plugins.values() if type(p).__name__ == "RunReport"]
        log = trainer.bus.caller_without("on_log", reports)
        if log is not None:
            log(
                trainer=trainer,
                kind="epoch",
                step=trainer.global_step,
                logs={f"test_{k}": v for k, v in self.results.items()},
            )


class PhaseClock:
    """Splits a fit's time into the training steps and the work between them: validation and every
    plugin's epoch-end and end-of-run work (checkpoints, report, loggers). Its hooks run first."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []  # (training steps, their seconds) per epoch
        self.first_begin: float | None = None
        self._began: tuple[float, int] | None = None

    @hookimpl(tryfirst=True)
    def on_epoch_begin(self, trainer) -> None:
        now = time.perf_counter()
        self.first_begin = self.first_begin or now
        self._began = (now, trainer.global_step)

    @hookimpl(tryfirst=True)
    def on_test_begin(self, trainer) -> None:
        self._steps_done(trainer)

    @hookimpl(tryfirst=True)
    def on_epoch_end(self, trainer) -> None:
        self._steps_done(trainer)

    def _steps_done(self, trainer) -> None:
        if self._began is not None:  # validation ends an epoch's steps; on_epoch_end does without it
            started, step = self._began
            self.epochs.append((trainer.global_step - step, time.perf_counter() - started))
            self._began = None

    def lines(self, fit_seconds: float, fit_started: float) -> list[str]:
        """The summary's time lines: training speed apart from epoch-end work."""
        steps = sum(n for n, _ in self.epochs)
        training = sum(t for _, t in self.epochs)
        start = (self.first_begin or fit_started) - fit_started
        later = self.epochs[1:] or self.epochs  # the first epoch also traces the compiled step
        later_steps, later_seconds = sum(n for n, _ in later), sum(t for _, t in later)
        speed = later_steps / later_seconds if later_seconds > 0 else float("nan")
        which = "epochs after the first, which also traces the compiled step" if len(self.epochs) > 1 else "one epoch"
        return [
            f"time: {fit_seconds:.1f}s = training steps {training:.1f}s + epoch-end work "
            f"{fit_seconds - training - start:.1f}s (validation, checkpoints, report, loggers) + start {start:.1f}s",
            f"training speed: {speed:.0f} steps/s ({steps} steps; measured over the {which})",
        ]


def load_digits_split(seed: int = 0):
    """Digits (8x8 images, 10 classes) scaled to [0, 1], split 80/20; no download."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def digits_mlp(seed: int = 0):
    """The benchmark model: an MLP 64-256-256-10."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


ACCUMULATE = 2  # micro-batches per optimizer update in the demo


def demo_plugins(run_dir: Path, steps_per_epoch: int, epochs: int, test: TestEvaluation | None = None) -> list:
    """The default stack, by entry-point name, exactly as a config file would name it (``test``,
    when given, runs after early stopping's end of training and before the loggers').

    ``steps_per_epoch`` counts batches; schedules count optimizer updates (batches / ACCUMULATE).
    """
    updates = max(1, steps_per_epoch // ACCUMULATE)
    return [
        {
            "name": "lr_schedule",
            "schedule": "cosine",
            "initial_learning_rate": 2e-3,
            "decay_steps": updates * epochs,
            "alpha": 0.05,
            "warmup_steps": updates,
        },
        {"name": "reduce_lr_on_plateau", "monitor": "val_loss", "factor": 0.5, "patience": 2},
        {"name": "gradient_clipping", "global_norm": 1.0},
        {"name": "gradient_accumulation", "steps": ACCUMULATE},
        {"name": "early_stopping", "monitor": "val_loss", "patience": 4, "restore_best_weights": True},
        *([("test_evaluation", test)] if test is not None else []),
        {"name": "terminate_on_nan", "check_every": 10},
        {"name": "stall_alert", "timeout": 60},
        {"name": "alert_log"},
        {
            "name": "checkpoint",
            "filepath": str(run_dir / "checkpoints" / "epoch{epoch:02d}-{val_loss:.4f}.weights.h5"),
            "monitor": "val_loss",
            "save_weights_only": True,
            "save_top_k": 3,
            "save_last": True,
        },
        {"name": "csv_logger", "filename": str(run_dir / "history.csv")},
        {"name": "backup", "backup_dir": str(run_dir / "backup")},
        {"name": "tensorboard", "log_dir": str(run_dir / "tensorboard"), "update_freq": 10, "histogram_freq": 5},
        {
            "name": "mlflow",
            "tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}",
            "experiment_name": "corebus-demo",
            "dir": str(run_dir / "mlflow"),
            "log_every_n_steps": 10,
        },
        {"name": "wandb", "mode": "offline", "dir": str(run_dir), "project": "corebus-demo", "log_every_n_steps": 10},
        {"name": "report", "report_dir": str(run_dir / "report"), "log_every_n_steps": 5},
    ]


def run_demo(epochs: int = 10, batch_size: int = 64, verbose: int = 1, root: str | Path = "corebus-runs") -> dict:
    import math

    check_demo_extras()
    import corebus

    (x_train, y_train), (x_test, y_test) = load_digits_split()
    run_dir = Path(root).resolve() / time.strftime("demo-%Y%m%d-%H%M%S")
    steps_per_epoch = math.ceil(len(x_train) * 0.9 / batch_size)
    clock, test_evaluation = PhaseClock(), TestEvaluation(x_test, y_test)
    trainer = corebus.Trainer(
        digits_mlp(),
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=[*demo_plugins(run_dir, steps_per_epoch, epochs, test_evaluation), ("phase_clock", clock)],
        seed=0,
        profile=True,
    )
    print(
        f"corebus {corebus.__version__} demo: digits ({len(x_train)} train / {len(x_test)} test), "
        f"MLP 64-256-256-10, {epochs} epochs\nrun directory: {run_dir}\n"
    )
    print(trainer.describe(verbose=verbose))
    start = time.perf_counter()
    history = trainer.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, validation_split=0.1, verbose=verbose)
    seconds = time.perf_counter() - start
    profile = trainer.bus.profile_report()
    test = test_evaluation.results
    _print_summary(history, trainer, clock.lines(seconds, start), test)
    _print_overhead(profile)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.h5"))
    print(f"\nwritten under {run_dir}:")
    print("  checkpoints: " + ", ".join(p.name for p in checkpoints))
    print(f"  epoch log:   {run_dir / 'history.csv'}")
    print(f"  TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"  MLflow:      mlflow ui --backend-store-uri sqlite:///{run_dir / 'mlflow.db'}")
    print(f"  W&B:         wandb sync {run_dir / 'wandb'}/offline-run-*   (offline run, upload when you like)")
    print(f"  report:      {run_dir / 'report' / 'report.html'}   (regenerate: corebus report {run_dir / 'report'})")
    print("  alerts:      the corebus.alerts log above; route them to Slack with alert_webhook (docs/alerts.md)")
    print("  run again:   the same stack from a file: corebus run <config.toml> (docs/config-runs.md)")
    return {"history": history.history, "test": test, "seconds": seconds, "run_dir": run_dir}


def _print_overhead(report: dict) -> None:
    rows = sorted(((sum(h["seconds"] for h in hooks.values()), name) for name, hooks in report.items()), reverse=True)
    print("host time per plugin (all hooks): " + ", ".join(f"{name} {t * 1e3:.0f} ms" for t, name in rows[:6]))


def history_plugins(trainer) -> dict:
    return dict(trainer._plugins)


def _print_summary(history, trainer, time_lines: list[str], test: dict) -> None:
    keys = list(history.history)
    header = ["epoch"] + keys
    rows = [[str(e + 1)] + [f"{history.history[k][i]:.4f}" for k in keys] for i, e in enumerate(history.epoch)]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print("\nSummary")
    print(line)
    print(" | ".join(h.rjust(w) for h, w in zip(header, widths)))
    print(line)
    for row in rows:
        print(" | ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print(line)
    stopper = history_plugins(trainer).get("early_stopping")
    if stopper is not None and stopper.best_epoch is not None:
        print(
            f"early stopping: best epoch {stopper.best_epoch + 1} (val_loss {stopper.best:.4f}); "
            f"stopped at epoch {stopper.stopped_epoch + 1 if stopper.stopped_epoch else '-'}"
        )
    print("\n".join(time_lines))
    print("test: " + "   ".join(f"{k}={v:.4f}" for k, v in test.items()))
