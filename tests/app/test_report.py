"""The run report: what report.json says is what happened in the run, checked against the
plugins that made it happen; the PNGs and HTML it renders; ``corebus report`` / ``compare``."""

import base64
import importlib.util
import json
import threading

import pytest

import corebus
from corebus import ConfigError, MissingExtraError, hookimpl
from corebus.app.cli import main
from corebus.bus.registry import resolve_all
from corebus.plugins.checkpoint import ModelCheckpoint
from corebus.plugins.early_stopping import EarlyStopping
from corebus.plugins.lr_schedule import LRSchedule
from corebus.plugins.reduce_lr_on_plateau import ReduceLROnPlateau
from corebus.plugins.report import RunReport
from corebus.testing import make_trainer, tiny_data, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
INITIAL_LR, WARMUP = 0.5, 5


class Witness:
    """What the report must agree with: checkpoint events, LR multipliers after every epoch end,
    and one alert raised from another thread (as the stall watchdog raises its alerts)."""

    def __init__(self):
        self.saved, self.multipliers = [], []

    @hookimpl
    def on_checkpoint_saved(self, filepath, step):
        self.saved.append((step, str(filepath)))

    @hookimpl(trylast=True)  # after the plateau plugin decided
    def on_epoch_end(self, trainer, epoch):
        self.multipliers.append(trainer.lr.multiplier)
        if epoch == 1:
            thread = threading.Thread(target=trainer.alert, args=("loss_check", "epoch 2 looked odd", "details here"))
            thread.start()
            thread.join()


def _read(report_dir):
    return json.loads((report_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    x, y = tiny_data()
    plugins = {
        "schedule": LRSchedule(
            "exponential", initial_learning_rate=INITIAL_LR, decay_steps=10, decay_rate=0.9, warmup_steps=WARMUP
        ),
        # min_delta=10: never an improvement, so it reduces at epochs 1, 3, 5, ... (cooldown 2)
        "plateau": ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=10.0, cooldown=2),
        "stopper": EarlyStopping(monitor="val_accuracy", patience=2),
        "checkpoint": ModelCheckpoint(str(root / "ckpt" / "e{epoch}.weights.h5"), save_weights_only=True),
        "witness": Witness(),
        "report": RunReport(root / "engine" / "report", log_every_n_steps=2),
    }
    trainer = make_trainer(list(plugins.values()), profile=True)
    history = trainer.fit(x, y, batch_size=16, epochs=10, validation_split=0.25, verbose=0)
    return plugins, history, root / "engine" / "report", trainer


def test_report_json_matches_the_run(engine_run):
    plugins, history, report_dir, trainer = engine_run
    report = _read(report_dir)
    assert report["run"]["status"] == "finished" and report["run"]["global_step"] == trainer.global_step

    # epoch logs: the History, value for value
    epochs = report["epochs"]
    assert [e["epoch"] for e in epochs] == history.epoch
    for key, values in history.history.items():
        assert [e["logs"][key] for e in epochs] == values, key

    # early stopping stopped this run; its best epoch is the report's
    stopper = plugins["stopper"]
    assert 0 < stopper.stopped_epoch == history.epoch[-1] < 9
    assert report["early_stopping"]["best_epoch"] == stopper.best_epoch
    assert report["early_stopping"]["stopped_epoch"] == stopper.stopped_epoch
    assert report["early_stopping"]["best"] == pytest.approx(stopper.best)

    # LR reductions: where ReduceLROnPlateau's multiplier dropped, by its factor
    multipliers = [1.0] + plugins["witness"].multipliers
    dropped = [e for e in history.epoch if multipliers[e + 1] < multipliers[e]]
    reductions = report["lr"]["reductions"]
    assert [r["epoch"] for r in reductions] == dropped == list(range(1, history.epoch[-1] + 1, 2))
    assert all(r["factor"] == pytest.approx(0.5) and r["lr_after"] < r["lr_before"] for r in reductions)
    assert [r["step"] for r in reductions] == [epochs[e]["step"] for e in dropped]

    # warm-up: its end, and the per-step LR ramp before it (value = schedule(step) at that step)
    assert [w["end_step"] for w in report["lr"]["warmup"]] == [WARMUP]
    batches = report["batches"]
    assert batches["every"] == 2 and batches["step"] == list(range(2, trainer.global_step + 1, 2))
    ramp = [(s, lr) for s, lr in zip(batches["step"], batches["values"]["learning_rate"]) if s <= WARMUP]
    assert ramp and all(lr == pytest.approx(INITIAL_LR * s / WARMUP) for s, lr in ramp)
    assert all(v > 0 for v in batches["values"]["grad_norm"]) and len(batches["values"]["loss"]) == len(batches["step"])

    # checkpoints: exactly the on_checkpoint_saved events
    assert [(c["step"], c["filepath"]) for c in report["checkpoints"]] == plugins["witness"].saved
    assert len(report["checkpoints"]) == len(history.epoch)
    assert report["checkpoints"][0]["metadata"]["kind"] == "weights"

    # the alert raised from another thread
    (alert,) = report["alerts"]
    assert (alert["kind"], alert["title"], alert["level"]) == ("loss_check", "epoch 2 looked odd", "warning")

    # the overhead profile, per plugin
    assert {"LRSchedule", "ReduceLROnPlateau", "EarlyStopping"} <= set(report["profile"])


def test_plots_and_self_contained_html(engine_run):
    _, history, report_dir, _ = engine_run
    html = (report_dir / "report.html").read_text()
    for name in ("curves", "learning_rate", "grad_norm", "timeline", "overhead"):
        png = (report_dir / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 10_000, name
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html, name
    assert "<h2>Summary</h2>" in html and "best epoch" in html and "LR reductions" in html
    assert "loss_check" in html and "e1.weights.h5" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html


def test_cli_report_regenerates_identical_files(engine_run, capsys):
    _, _, report_dir, _ = engine_run
    files = sorted(p for p in report_dir.iterdir() if p.suffix in (".png", ".html"))
    before = {p.name: p.read_bytes() for p in files}
    for p in files:
        p.unlink()
    assert main(["report", str(report_dir.parent)]) == 0  # the run directory holding report/
    assert {p.name: p.read_bytes() for p in files} == before


def test_cli_explains_a_missing_report(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "report.json") in err and "report plugin" in err
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "report.json" in capsys.readouterr().err


def test_model_fit_report_and_compare(engine_run, tmp_path):
    _, _, engine_dir, _ = engine_run
    x, y = tiny_data()
    callback = corebus.KerasCallback([RunReport(tmp_path / "keras" / "report", log_every_n_steps=3)])
    model = tiny_model()
    model.compile(
        optimizer=callback.wrap_optimizer("adam"), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    history = model.fit(x, y, batch_size=16, epochs=3, validation_split=0.25, verbose=0, callbacks=[callback])
    report = _read(tmp_path / "keras" / "report")
    for key, values in history.history.items():
        assert [e["logs"][key] for e in report["epochs"]] == pytest.approx(values), key
    assert report["batches"]["step"] == [3, 6, 9, 12, 15] and "grad_norm" in report["batches"]["values"]
    assert report["profile"] is None and "profile off" in (tmp_path / "keras" / "report" / "report.html").read_text()
    assert (tmp_path / "keras" / "report" / "curves.png").read_bytes().startswith(PNG)

    out = tmp_path / "compare"
    assert main(["compare", str(engine_dir.parent), str(tmp_path / "keras"), "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["labels"] == ["engine", "keras"] and summary["metric"] == "val_loss"
    assert [r["epochs"] for r in summary["runs"]] == [len(_read(engine_dir)["epochs"]), 3]
    page = (out / "compare.html").read_text()
    assert "engine" in page and "keras" in page and "data:image/png;base64," in page
    assert (out / "compare.png").read_bytes().startswith(PNG)
    assert main(["compare", str(engine_dir), "--metric", "val_auc", "--out", str(out)]) == 2


def test_failed_run_is_reported_failed(tmp_path):
    class Boom:
        @hookimpl
        def on_epoch_end(self, epoch):
            if epoch == 1:
                raise RuntimeError("disk on fire")

    x, y = tiny_data()
    report_dir = tmp_path / "report"
    trainer = make_trainer([RunReport(report_dir, log_every_n_steps=None, gradient_norm=False), Boom()])
    with pytest.raises(corebus.PluginError, match="disk on fire"):
        trainer.fit(x, y, batch_size=32, epochs=4, verbose=0)
    report = _read(report_dir)
    assert report["run"]["status"] == "failed" and "disk on fire" in report["run"]["error"]
    assert [e["epoch"] for e in report["epochs"]] == [0] and report["batches"]["step"] == []
    assert report["profile_note"] == "profile off: Trainer(profile=True)"
    assert "failed" in (report_dir / "report.html").read_text()


def test_bad_params_and_missing_matplotlib_fail_before_training(tmp_path, monkeypatch):
    ((name, plugin),) = resolve_all([{"name": "report", "report_dir": str(tmp_path / "r")}])
    assert isinstance(plugin, RunReport) and plugin.runs_on == "chief" and plugin.gradient_taps == {"norm"}
    with pytest.raises(ConfigError, match="log_every_n_steps"):
        RunReport(tmp_path, log_every_n_steps=0)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else find_spec(n, *a))
    with pytest.raises(MissingExtraError, match=r"matplotlib.*pip install"):
        RunReport(tmp_path)


class SlowEnd:
    """Ends last of the ordinary plugins (trylast) and takes a measurable time, saving a file."""

    def __init__(self, path):
        self.path = path

    @hookimpl(trylast=True)
    def on_train_end(self, trainer):
        import time

        time.sleep(0.2)
        trainer.model.save_weights(str(self.path))
        trainer.bus.call(
            "on_checkpoint_saved",
            trainer=trainer,
            filepath=str(self.path),
            step=trainer.global_step,
            metadata={"by": "slow_end"},
        )


def test_report_is_written_after_every_other_plugins_train_end_and_counts_kept_checkpoints(tmp_path):
    x, y = tiny_data(n=64)
    ckpt = tmp_path / "ckpt"
    plugins = [
        RunReport(tmp_path / "corebus-runs" / "nightly-7" / "report", log_every_n_steps=None),
        # save_top_k=2 over 6 epochs whose val_loss falls: files are saved and later deleted
        ModelCheckpoint(str(ckpt / "e{epoch}.weights.h5"), monitor="val_loss", save_top_k=2, save_weights_only=True),
        SlowEnd(tmp_path / "final.weights.h5"),
    ]
    trainer = make_trainer(plugins, profile=True)
    trainer.fit(x, y, batch_size=16, epochs=6, validation_split=0.25, verbose=0)
    report = _read(tmp_path / "corebus-runs" / "nightly-7" / "report")
    run = report["run"]
    # written after SlowEnd's trylast on_train_end: its time, its checkpoint and its profile are in
    assert report["profile"]["SlowEnd"]["on_train_end"]["seconds"] >= 0.2
    assert report["checkpoints"][-1]["metadata"] == {"by": "slow_end"} and report["checkpoints"][-1]["kept"] is True
    saved = {c["filepath"] for c in report["checkpoints"]}
    on_disk = {str(p) for p in ckpt.glob("*.weights.h5")} | {str(tmp_path / "final.weights.h5")}
    assert run["checkpoints_saved"] == len(saved) > run["checkpoints_kept"] == len(on_disk) == 3
    assert {c["filepath"] for c in report["checkpoints"] if c["kept"]} == on_disk
    # titled with the run's name (the run folder holding report/), here and in the HTML's title
    assert run["name"] == "nightly-7"
    html = (tmp_path / "corebus-runs" / "nightly-7" / "report" / "report.html").read_text()
    assert "<title>nightly-7 - corebus run report</title>" in html
    assert f"{len(saved)} saved, 3 kept" in html
    # the timeline labels kept files only, one each: no pile of overlapping names
    from corebus.app.report_plots import timeline_labels

    labels = [name for _, name in timeline_labels(report["checkpoints"])]
    assert sorted(labels) == sorted(p.rsplit("/", 1)[-1] for p in on_disk)


def test_explicit_name_wins_and_epochs_read_from_one(tmp_path):
    x, y = tiny_data(n=32)
    stopper = EarlyStopping(monitor="loss", patience=0, min_delta=10.0)  # stops at the second epoch
    make_trainer([RunReport(tmp_path / "r", log_every_n_steps=None, name="baseline"), stopper]).fit(
        x, y, batch_size=16, epochs=5, verbose=0
    )
    report = _read(tmp_path / "r")
    assert report["run"]["name"] == "baseline"
    assert [e["epoch"] for e in report["epochs"]] == [0, 1]  # JSON: Keras's indices, as History.epoch
    from corebus.app.report import _summary

    rows = dict(_summary(report))
    assert rows["early stopping"] == "stopped at epoch 2" and rows["best epoch"].startswith("1 (loss")
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<tr><td>1</td>" in html and "<tr><td>0</td>" not in html  # the epochs table counts from 1


def test_step_overlay_lies_beneath_the_epoch_curves_and_fades_when_dense():
    from corebus.app.report_plots import _draw_curves

    steps = list(range(1, 2001))
    report = {
        "run": {"first_step": 0},
        "epochs": [{"epoch": e, "step": 400 * (e + 1), "logs": {"loss": 1.0 / (e + 1)}} for e in range(5)],
        "batches": {"every": 1, "step": steps, "values": {"loss": [1.0] * len(steps)}},
    }
    figure = _draw_curves(report)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    overlay, epoch_curve = lines["loss (every 1 steps)"], lines["loss"]
    assert overlay.get_zorder() < epoch_curve.get_zorder() and overlay.get_alpha() <= 0.1
