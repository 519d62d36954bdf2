"""BackupAndRestore (corebus: backup), following keras/src/callbacks/backup_and_restore_test.py and
terminate_on_nan_test.py::test_raise_error_terminate_preserves_backup (see README.md).

A run is interrupted by a Keras callback that raises (at an epoch end or after a batch), then
the same model is fitted again with the same backup object; a layer counting its training
calls shows how many steps ran, and the final weights are compared with Keras's in
``model.fit`` on the same run.
"""

import logging
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from suite import ALL_WAYS, fit_with

from corebus import ConfigError, PluginError
from corebus.plugins.backup import BackupAndRestore
from corebus.plugins.terminate_on_nan import TerminateOnNaN

rng = np.random.default_rng(3)
X, Y = rng.random((10, 3)).astype("float32"), rng.random((10, 1)).astype("float32")  # 3 batches of 4


class Interrupt(keras.callbacks.Callback):
    """Raises at the n-th epoch end or after the n-th batch."""

    def __init__(self, at_epoch=None, at_batch=None):
        super().__init__()
        self.at_epoch, self.at_batch, self.epochs, self.batches = at_epoch, at_batch, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1
        if self.epochs == self.at_epoch:
            raise RuntimeError("interrupted at an epoch end")

    def on_batch_end(self, batch, logs=None):
        self.batches += 1
        if self.batches == self.at_batch:
            raise RuntimeError("interrupted after a batch")


class Counter(keras.layers.Layer):
    """Counts its calls in training: one per step. ``ballast`` floats of state make a backup
    take a while to write."""

    def __init__(self, ballast=0, **kwargs):
        super().__init__(**kwargs)
        self.ballast = ballast

    def build(self, shape):
        self.count = self.add_weight(shape=(), initializer="zeros", trainable=False, name="count")
        if self.ballast:
            self.add_weight(shape=(self.ballast,), initializer="ones", trainable=False, name="ballast")

    def call(self, x, training=False):
        if training:
            self.count.assign_add(1.0)
        return x


def counted(ballast=0):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), Counter(ballast), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd", metrics=["mse"])
    return model


def steps(model):
    return int(model.layers[0].count.numpy())


def backup(way, directory, **kwargs):
    return (keras.callbacks.BackupAndRestore if way.startswith("keras") else BackupAndRestore)(str(directory), **kwargs)


def fit(way, model, callbacks, **kwargs):
    key = "callbacks" if way.startswith("keras") else "plugins"
    return fit_with(way, model, X, Y, batch_size=4, **{key: callbacks}, **kwargs)


def interrupted_and_resumed(way, directory, interrupt, first_epochs, *, corrupt=None, **kwargs):
    """(steps when interrupted, history and model of the resumed fit)."""
    model, saver = counted(), backup(way, directory, **kwargs)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(way, model, [saver], extra=[interrupt], epochs=first_epochs)
    at_stop = steps(model)
    assert directory.exists(), way
    if corrupt is not None:
        corrupt(directory)
    return at_stop, fit(way, model, [saver], epochs=5), model


def test_save_freq_must_be_epoch_or_an_integer():
    for save_freq in ("batch", 0.15):
        with pytest.raises(ValueError, match="Invalid value"):
            keras.callbacks.BackupAndRestore("backup_dir", save_freq=save_freq)
        with pytest.raises(ConfigError, match="use 'epoch' or a positive number of steps"):
            BackupAndRestore("backup_dir", save_freq=save_freq)


@pytest.mark.parametrize("backup_dir", ["", None])
def test_backup_dir_is_required(backup_dir):
    with pytest.raises(ValueError, match="Empty `backup_dir` argument passed"):
        keras.callbacks.BackupAndRestore(backup_dir)
    with pytest.raises(ConfigError, match="backup_dir is required"):
        BackupAndRestore(backup_dir)


def test_a_run_interrupted_at_an_epoch_end_resumes_after_the_last_whole_epoch(tmp_path):
    results = {
        way: interrupted_and_resumed(way, tmp_path / way / "subdir", Interrupt(at_epoch=2), 6) for way in ALL_WAYS
    }
    oracle = results["keras"][2]
    for way, (at_stop, history, model) in results.items():
        assert at_stop == 6, way  # two epochs of three batches
        assert history.epoch[-3:] == [2, 3, 4], way  # the epochs the snapshot had not finished
        assert steps(model) == 5 * 3, way
        for mine, theirs in zip(model.get_weights(), oracle.get_weights(), strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    for way in ("keras_in_trainer", "adapter"):  # model.fit's History: this fit's epochs
        assert results[way][1].epoch == [2, 3, 4], way


def test_the_engines_resumed_history_holds_every_epoch_of_the_run(tmp_path):
    # The engine's History is restored with the snapshot: after a resume it holds the whole run.
    _, history, _ = interrupted_and_resumed("engine", tmp_path / "subdir", Interrupt(at_epoch=2), 6)
    assert history.epoch == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("way", ALL_WAYS)
def test_a_run_interrupted_after_a_batch_resumes(tmp_path, way, caplog):
    with caplog.at_level(logging.WARNING, "corebus"):
        at_stop, history, model = interrupted_and_resumed(
            way, tmp_path / "subdir", Interrupt(at_batch=2), 2, save_freq=1
        )
    assert at_stop == 2
    assert history.epoch[-1] == 4
    if way == "engine":
        # The engine resumes at the exact next step: the two batches trained before the
        # interruption are not trained again (README.md).
        assert history.epoch == [0, 1, 2, 3, 4] and steps(model) == 2 + 13
    else:
        # Keras restores the weights of step 2 and starts epoch 0 again from its first batch
        # (model.fit cannot start an epoch mid-way: the adapter's plugin says so and snapshots
        # at epoch ends only).
        assert steps(model) == 2 + 15
    if way == "adapter":
        assert "model.fit resumes per epoch" in caplog.text


def corrupt_the_newest(directory):
    keras_file = directory / "latest.weights.h5"
    if keras_file.exists():
        keras_file.write_text("0")
    else:
        newest = sorted(directory.glob("snapshot-*"))[-1]
        (newest / "arrays.npz").write_text("0")


@pytest.mark.parametrize("way", ALL_WAYS)
def test_a_corrupt_newest_backup_falls_back_to_the_one_before(tmp_path, way):
    # Keras keeps the previous backup with double_checkpoint=True; the plugin always keeps two.
    # (background=False: the newest snapshot is on disk when fit raises; see the test below)
    kwargs = {"double_checkpoint": True} if way.startswith("keras") else {"background": False}
    at_stop, history, model = interrupted_and_resumed(
        way, tmp_path / "subdir", Interrupt(at_epoch=2), 6, corrupt=corrupt_the_newest, **kwargs
    )
    assert at_stop == 6
    # from the backup of the first epoch (the engine's History holds the whole run)
    assert history.epoch == ([0, 1, 2, 3, 4] if way == "engine" else [1, 2, 3, 4])
    assert steps(model) == 3 + 4 * 3


@pytest.mark.parametrize("way", ALL_WAYS)
def test_a_normal_end_removes_the_backup_dir(tmp_path, way):
    directory = tmp_path / "subdir"
    fit(way, counted(), [backup(way, directory)], epochs=2)
    assert not directory.exists()


@pytest.mark.parametrize("way", ALL_WAYS)
def test_an_error_raised_by_terminate_on_nan_keeps_the_backup(tmp_path, way):
    directory = tmp_path / "backups"
    directory.mkdir()
    (directory / "checkpoint.txt").write_text("dummy checkpoint")
    stop = (
        keras.callbacks.TerminateOnNaN(raise_error=True)
        if way.startswith("keras")
        else TerminateOnNaN(raise_error=True)
    )
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    key = "callbacks" if way.startswith("keras") else "plugins"
    # Keras raises its RuntimeError; a corebus plugin's error comes as PluginError naming the
    # plugin, the hook and the RuntimeError (README.md)
    with pytest.raises((RuntimeError, PluginError)) as raised:
        fit_with(way, model, np.array([[1.0]]), np.array([[np.inf]]), epochs=1, **{key: [backup(way, directory), stop]})
    assert "NaN or Inf loss" in str(raised.value)
    assert (directory / "checkpoint.txt").read_text() == "dummy checkpoint"


BALLAST = 4_000_000  # 16 MB: a snapshot write lasts far longer than the process takes to die

# A process that dies as fit raises (killed, or exiting at once): what is on disk is all the rerun has.
DIES = """
import os, sys
sys.path.insert(0, {suite!r})
from test_backup_and_restore import BALLAST, Interrupt, backup, counted, fit
try:
    fit({way!r}, counted(BALLAST), [backup({way!r}, {directory!r})], extra=[Interrupt(at_epoch=2)], epochs=6)
except RuntimeError as exc:
    print(exc, file=sys.stderr, flush=True)
    os._exit(1)
"""


def killed_by_the_error(way, directory):
    code = DIES.format(suite=str(Path(__file__).parent), way=way, directory=str(directory))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "interrupted at an epoch end" in done.stderr, done.stderr[-2000:]
    model, trained = counted(BALLAST), EpochsTrained()
    fit(way, model, [backup(way, directory)], extra=[trained], epochs=5)
    return trained.epochs, model


class EpochsTrained(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


@pytest.fixture(scope="module")
def keras_rerun(tmp_path_factory):
    return killed_by_the_error("keras", tmp_path_factory.mktemp("keras") / "subdir")


@pytest.mark.parametrize("way", ["adapter", "engine"])
def test_a_process_killed_by_the_error_resumes_where_keras_does(tmp_path, way, keras_rerun):
    trained, model = killed_by_the_error(way, tmp_path / "subdir")
    assert keras_rerun[0] == [2, 3, 4]  # Keras's backup of the second epoch is on disk
    assert trained == keras_rerun[0]
    assert steps(model) == steps(keras_rerun[1]) == 6 + 9
    for mine, theirs in zip(model.get_weights(), keras_rerun[1].get_weights(), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
