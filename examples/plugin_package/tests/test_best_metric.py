"""Tests for the best_metric plugin, written with corebus.testing's fixtures.

corebus installs a pytest plugin, so ``tiny_data`` (a small learnable dataset), ``tiny_model``,
``recorder`` (a plugin recording every hook call) and ``make_trainer`` (a seeded Trainer on the
tiny model) are available here without an import.
"""

import json

import pytest

import corebus
from corebus.testing import fit_both_ways

from corebus_best_metric import BestMetric


def read(path):
    return json.loads(path.read_text())


def test_keeps_the_best_epoch_in_a_file(make_trainer, tiny_data, recorder, tmp_path):
    x, y = tiny_data
    plugin = BestMetric(monitor="val_loss", path=tmp_path / "best.json")
    history = make_trainer([plugin, recorder]).fit(x, y, batch_size=16, epochs=4, validation_split=0.25, verbose=0)

    val_loss = history.history["val_loss"]
    best_epoch = min(range(len(val_loss)), key=val_loss.__getitem__)
    saved = read(tmp_path / "best.json")
    assert saved == {
        "monitor": "val_loss",
        "mode": "min",
        "best": pytest.approx(val_loss[best_epoch]),
        "epoch": best_epoch + 1,
        "step": (best_epoch + 1) * 5,
        "epochs_seen": 4,
        "finished": True,
    }
    # the recorder saw the same epochs, and the run ended normally
    assert [e[1] for e in recorder.events if e[0] == "on_epoch_end"] == [0, 1, 2, 3]
    assert recorder.names()[-1] == "on_train_end"


def test_max_mode_for_accuracy(make_trainer, tiny_data, tmp_path):
    x, y = tiny_data
    plugin = BestMetric(monitor="val_accuracy", path=tmp_path / "best.json")
    assert plugin.mode == "max"  # "auto" reads the name
    history = make_trainer([plugin], optimizer="adam").fit(
        x, y, batch_size=16, epochs=3, validation_split=0.25, verbose=0
    )
    assert read(tmp_path / "best.json")["best"] == pytest.approx(max(history.history["val_accuracy"]))


def test_same_result_in_trainer_fit_and_model_fit(tiny_data, tmp_path):
    x, y = tiny_data
    paths = iter([tmp_path / "engine.json", tmp_path / "keras.json"])
    (engine, _), (keras_plugins, _) = fit_both_ways(
        lambda: [BestMetric(monitor="loss", path=next(paths))], x, y, batch_size=32, epochs=3
    )
    assert engine[0].best_epoch == keras_plugins[0].best_epoch
    assert engine[0].best == pytest.approx(keras_plugins[0].best, rel=1e-5)
    assert read(tmp_path / "engine.json")["step"] == read(tmp_path / "keras.json")["step"]


def test_state_survives_a_resume(make_trainer, tiny_data, tmp_path):
    x, y = tiny_data
    first = BestMetric(monitor="loss", path=tmp_path / "best.json")
    make_trainer([first]).fit(x, y, batch_size=32, epochs=2, verbose=0)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-friendly, as snapshots need

    resumed = BestMetric(monitor="loss", path=tmp_path / "best.json")
    resumed.load_state_dict(state)
    resumed.on_train_begin()  # a restored instance keeps its best at the next train begin
    assert (resumed.best, resumed.best_epoch, resumed.epochs_seen) == (first.best, first.best_epoch, 2)


def test_activated_by_entry_point_name(make_trainer, tiny_data, tmp_path):
    # needs the package installed (pip install -e .): corebus finds it through its entry point
    names = {info.name: info for info in corebus.installed_plugins()}
    assert names["best_metric"].distribution == "corebus-best-metric"
    trainer = make_trainer([{"name": "best_metric", "monitor": "loss", "path": str(tmp_path / "b.json")}])
    x, y = tiny_data
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert isinstance(trainer.bus.plugins["best_metric"], BestMetric)  # the run's bus, by name
    assert read(tmp_path / "b.json")["epochs_seen"] == 1


def test_bad_mode_fails_before_training(tmp_path):
    with pytest.raises(corebus.ConfigError, match="mode='median'"):
        BestMetric(mode="median", path=tmp_path / "best.json")
