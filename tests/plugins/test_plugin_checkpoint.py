"""ModelCheckpoint against keras.callbacks.ModelCheckpoint, on real files in tmp_path."""

import contextlib
import io
import json
import os
import re
import zipfile

import h5py
import keras
import numpy as np
import pytest

import corebus
from corebus import ConfigError, PluginError, hookimpl
from corebus.plugins.checkpoint import ModelCheckpoint
from corebus.testing import make_trainer, tiny_model

# A learning rate high enough that val_loss goes up and down (improving epochs and not),
# so save_best_only and save_top_k have something to decide.
FIT = dict(batch_size=16, epochs=5, validation_split=0.25, shuffle=False, verbose=0)
LR = 3.0


class Saved:
    """Records on_checkpoint_saved, and whether the file was in place when announced."""

    def __init__(self):
        self.events = []

    @hookimpl
    def on_checkpoint_saved(self, trainer, filepath, step, metadata):
        self.events.append((filepath, step, dict(metadata), os.path.isfile(filepath), trainer.global_step))


class WeightsAt:
    """The model's weights after every train call, by global step (the truth files must hold)."""

    def __init__(self):
        self.by_step = {}

    @hookimpl(tryfirst=True)
    def on_train_batch_end(self, trainer):
        self.by_step[trainer.global_step] = [np.array(w) for w in trainer.model.get_weights()]


def compiled_model(lr=LR, steps_per_execution=1, optimizer=None):
    model = tiny_model()
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def run(plugins, x, y, via="engine", lr=LR, steps_per_execution=1, optimizer=None, **fit_kwargs):
    """Train with corebus plugins in Trainer.fit or in model.fit; returns (model, history)."""
    fit_kwargs = {**FIT, **fit_kwargs}
    optimizer = optimizer or keras.optimizers.SGD(lr)
    if via == "engine":
        trainer = make_trainer(plugins, optimizer=optimizer, steps_per_execution=steps_per_execution)
        return trainer.model, trainer.fit(x, y, **fit_kwargs)
    model = compiled_model(steps_per_execution=steps_per_execution, optimizer=optimizer)
    return model, model.fit(x, y, callbacks=[corebus.KerasCallback(plugins)], **fit_kwargs)


def files(directory):
    return sorted(os.listdir(directory))


def datasets(path):
    """Every array a checkpoint holds (model and optimizer variables), whatever its format."""
    path = str(path)
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            handle = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    else:
        handle = h5py.File(path, "r")
    found = {}
    handle.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    handle.close()
    return found


def assert_same_arrays(a, b, **tolerance):
    assert len(a) == len(b)
    for left, right in zip(a, b):
        np.testing.assert_allclose(left, right, **tolerance)


# ------------------------------------------------------------------------- the Keras oracle


def messages(text, folder):
    """Verbose lines, with the folder and the 5th decimal (float noise) left out."""
    text = text.replace(str(folder), "<dir>")
    return [re.sub(r"(\d+\.\d{4})\d", r"\1", line) for line in text.splitlines() if line.startswith("Epoch")]


def pattern(monitor):
    return "{epoch:02d}-{%s:.3f}.keras" % monitor


@pytest.fixture(scope="module")
def keras_reference(tmp_path_factory):
    """What keras.callbacks.ModelCheckpoint writes, per (monitor, threshold); each run once."""
    from corebus.testing import tiny_data

    found = {}

    def reference(monitor, threshold):
        if (monitor, threshold) not in found:
            folder = tmp_path_factory.mktemp(f"keras_{monitor}")
            callback = keras.callbacks.ModelCheckpoint(
                str(folder / pattern(monitor)),
                monitor=monitor,
                verbose=1,
                save_best_only=True,
                initial_value_threshold=threshold,
            )
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                compiled_model().fit(*tiny_data(), callbacks=[callback], **FIT)
            found[monitor, threshold] = (folder, float(callback.best), messages(printed.getvalue(), folder))
        return found[monitor, threshold]

    return reference


@pytest.mark.parametrize(
    "via, monitor, threshold",
    [
        ("engine", "val_loss", None),
        ("model_fit", "val_loss", None),
        ("engine", "val_accuracy", None),
        ("model_fit", "val_loss", 0.2),
    ],
)
def test_same_files_as_keras_model_checkpoint(tmp_path, tiny_data, keras_reference, via, monitor, threshold, capsys):
    x, y = tiny_data
    ours = ModelCheckpoint(
        tmp_path / pattern(monitor), monitor=monitor, save_best_only=True, verbose=1, initial_value_threshold=threshold
    )
    capsys.readouterr()
    run([ours], x, y, via=via)

    folder, best, printed = keras_reference(monitor, threshold)
    assert messages(capsys.readouterr().out, tmp_path) == printed and len(printed) > FIT["epochs"]  # verbose=1
    names = files(folder)
    assert files(tmp_path) == names
    # some epochs improved, some did not (val_accuracy ties, values above the threshold)
    assert 2 <= len(names) < FIT["epochs"] - (threshold is not None)
    assert ours.best == pytest.approx(best, rel=1e-5)
    for name in names:  # every array, model and optimizer
        theirs, mine = datasets(folder / name), datasets(tmp_path / name)
        assert sorted(mine) == sorted(theirs)
        assert_same_arrays([mine[k] for k in sorted(mine)], [theirs[k] for k in sorted(mine)], rtol=1e-5, atol=1e-6)


def test_save_freq_in_steps_like_keras(tmp_path, tiny_data):
    # With one step per call Keras's batch counter and our step cadence agree exactly.
    x, y = tiny_data
    pattern = "e{epoch}-b{batch:02d}.weights.h5"
    reference = keras.callbacks.ModelCheckpoint(str(tmp_path / "keras" / pattern), save_weights_only=True, save_freq=5)
    compiled_model(lr=0.1).fit(x, y, callbacks=[reference], batch_size=8, epochs=2, shuffle=False, verbose=0)
    run(
        [ModelCheckpoint(tmp_path / "ours" / pattern, save_weights_only=True, save_freq=5)],
        x,
        y,
        lr=0.1,
        batch_size=8,
        epochs=2,
        validation_split=0.0,
    )
    assert files(tmp_path / "ours") == files(tmp_path / "keras")
    assert len(files(tmp_path / "keras")) == 24 // 5


@pytest.mark.parametrize("via, background", [("engine", False), ("model_fit", True)])
def test_save_freq_crosses_step_boundaries_under_steps_per_execution(tmp_path, tiny_data, via, background):
    x, y = tiny_data
    weights, saved = WeightsAt(), Saved()
    plugin = ModelCheckpoint(
        tmp_path / "s{step:03d}.weights.h5", save_weights_only=True, save_freq=5, background=background
    )
    run(
        [weights, plugin, saved],
        x,
        y,
        via=via,
        lr=0.1,
        steps_per_execution=3,
        batch_size=8,
        epochs=2,
        validation_split=0.0,
    )
    # 12 steps per epoch in calls of 3: the step jumps 3, 6, 9, ... 24; a save is due at the
    # first call end that reaches or passes each multiple of 5 (never `step % 5 == 0`).
    call_ends = sorted(weights.by_step)
    assert call_ends == list(range(3, 25, 3))
    due = [s for s in call_ends if s // 5 > (s - 3) // 5]
    assert due == [6, 12, 15, 21]
    assert files(tmp_path) == [f"s{s:03d}.weights.h5" for s in due]
    assert [e[1] for e in saved.events] == due
    for step in due:
        model = tiny_model()
        model.load_weights(tmp_path / f"s{step:03d}.weights.h5")
        assert_same_arrays(model.get_weights(), weights.by_step[step], rtol=0, atol=0)


# ------------------------------------------------------------------------- beyond Keras


def test_save_top_k_keeps_the_k_best_and_deletes_the_rest(tmp_path, tiny_data):
    x, y = tiny_data
    saved = Saved()
    plugin = ModelCheckpoint(tmp_path / "{epoch:02d}.keras", save_top_k=2)
    _, history = run([plugin, saved], x, y)
    val_loss = history.history["val_loss"]
    best_two = sorted(range(len(val_loss)), key=val_loss.__getitem__)[:2]
    assert files(tmp_path) == sorted(f"{e + 1:02d}.keras" for e in best_two)
    assert [v for _, v in plugin._top_k] == sorted(val_loss)[:2]
    # more files were written than kept: the ones that fell out were deleted
    written = [e[0] for e in saved.events]
    assert len(written) > 2 and all(exists for *_, exists, _ in saved.events)
    for name in files(tmp_path):
        epoch = int(name[:2]) - 1
        assert written.count(str(tmp_path / name)) == 1
        assert saved.events[written.index(str(tmp_path / name))][2]["value"] == pytest.approx(val_loss[epoch])


def test_save_last_follows_every_epoch_while_best_only_skips(tmp_path, tiny_data):
    x, y = tiny_data
    saved = Saved()
    plugin = ModelCheckpoint(
        tmp_path / "{epoch:02d}.weights.h5", save_weights_only=True, save_best_only=True, save_last=True
    )
    model, history = run([plugin, saved], x, y)
    val_loss = history.history["val_loss"]
    improved = [e for e, v in enumerate(val_loss) if v < min(val_loss[:e], default=np.inf)]
    assert files(tmp_path) == sorted([f"{e + 1:02d}.weights.h5" for e in improved] + ["last.weights.h5"])
    assert len(improved) < FIT["epochs"]  # the last epochs did not improve, "last" still moved on
    restored = tiny_model()
    restored.load_weights(tmp_path / "last.weights.h5")
    assert_same_arrays(restored.get_weights(), model.get_weights(), rtol=0, atol=0)
    lasts = [e for e in saved.events if e[2]["last"]]
    assert [e[2]["epoch"] for e in lasts] == list(range(FIT["epochs"]))


@pytest.mark.parametrize(
    "name, weights_only", [("ckpt.keras", False), ("ckpt.weights.h5", True), ("best_model.h5", False)]
)
def test_formats_load_back(tmp_path, tiny_data, name, weights_only):
    x, y = tiny_data
    model, _ = run([ModelCheckpoint(tmp_path / name, save_weights_only=weights_only)], x, y, epochs=2)
    if weights_only:
        loaded = tiny_model(seed=1)
        loaded.load_weights(tmp_path / name)
    else:
        loaded = keras.saving.load_model(tmp_path / name, safe_mode=True)
        assert loaded.optimizer.iterations.numpy() == model.optimizer.iterations.numpy() > 0
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    assert files(tmp_path) == [name]  # no temporary file left behind


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, tiny_data, monkeypatch, background):
    x, y = tiny_data
    weights = WeightsAt()
    trainer = make_trainer(
        [weights, ModelCheckpoint(tmp_path / "model.keras", background=background)], optimizer=keras.optimizers.SGD(0.1)
    )
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    good = list(weights.by_step[trainer.global_step])

    def dies_mid_write(model, filepath, *args, **kwargs):
        with open(filepath, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", dies_mid_write)
    with pytest.raises(PluginError, match="disk full"):
        trainer.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, verbose=0)
    monkeypatch.undo()
    assert files(tmp_path) == ["model.keras"]
    assert_same_arrays(keras.saving.load_model(tmp_path / "model.keras").get_weights(), good, rtol=0, atol=0)


# (.weights.h5 in the background: test_save_freq_crosses_step_boundaries_under_steps_per_execution)
@pytest.mark.parametrize("name", ["{step}.keras", "{step}.h5"])
def test_background_writes_the_same_files(tmp_path, tiny_data, name):
    x, y = tiny_data
    results = {}
    for background in (False, True):
        keras.backend.clear_session()  # same layer names in both runs (legacy .h5 stores them)
        saved = Saved()
        plugin = ModelCheckpoint(
            tmp_path / str(background) / name,
            save_freq=3,
            save_top_k=2,
            monitor="loss",
            save_last=True,
            background=background,
        )
        run([plugin, saved], x, y, optimizer=keras.optimizers.Adam(0.05), epochs=3)
        results[background] = (plugin, saved)
    assert files(tmp_path / "True") == files(tmp_path / "False")
    assert len(files(tmp_path / "True")) == 3  # top 2 + last
    for file in files(tmp_path / "False"):
        ours, theirs = datasets(tmp_path / "True" / file), datasets(tmp_path / "False" / file)
        assert sorted(ours) == sorted(theirs) and any(k.startswith("optimizer") for k in ours)
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)

    def strip(events):
        return [(os.path.basename(p), s, m["last"], exists) for p, s, m, exists, _ in events]

    assert strip(results[True][1].events) == strip(results[False][1].events)
    assert all(exists for *_, exists in strip(results[True][1].events))
    assert len(results[True][1].events) == len(results[False][1].events) >= 5 + 5


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"filepath": "m.weights.h5"}, "save_weights_only=True"),
        ({"filepath": "m.keras", "save_weights_only": True}, "'.weights.h5'"),
        ({"filepath": "m.pt"}, "ending in '.keras'"),
        ({"mode": "maximum"}, "mode='maximum' is unknown"),
        ({"save_top_k": 2, "monitor": None}, "pass monitor="),
        ({"save_best_only": True, "monitor": None}, "pass monitor="),
        ({"save_top_k": 0}, "save_top_k=0 must be an integer >= 1"),
        ({"filepath": "fixed.keras", "save_top_k": 2}, "needs a placeholder"),
        ({"save_freq": 0}, "save_freq=0"),
        ({"save_freq": "batch"}, "save_freq='batch'"),
        ({"filepath": "{epoch.keras"}, "bad placeholder"),
    ],
)
def test_bad_input_is_a_config_error(tmp_path, kwargs, message):
    kwargs = {"filepath": "{epoch}.keras", **kwargs}
    kwargs["filepath"] = str(tmp_path / kwargs["filepath"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelCheckpoint(**kwargs)


class Epochs:
    """Counts the epochs that began (how far training got before an error)."""

    def __init__(self):
        self.begun = 0

    @hookimpl
    def on_epoch_begin(self):
        self.begun += 1


@pytest.mark.parametrize("via", ["engine", "model_fit"])
def test_a_filepath_placeholder_the_logs_lack_is_a_clear_error_at_the_first_epoch_end(tmp_path, tiny_data, via):
    epochs = Epochs()
    with pytest.raises(ConfigError) as info:
        run(
            [ModelCheckpoint(tmp_path / "{epoch:02d}-{val_acc:.3f}.keras", monitor="val_loss"), epochs],
            *tiny_data,
            via=via,
        )
    message = str(info.value)
    assert "the placeholder {val_acc} names a key the epoch logs do not have" in message
    assert "did you mean {val_accuracy}?" in message
    assert message.endswith("Available keys: accuracy, epoch, loss, step, val_accuracy, val_loss")
    assert epochs.begun == 1 and not list(tmp_path.glob("*.keras"))  # stopped at the first epoch end
    # Keras, on the same run, fails there too but only with a bare KeyError naming the key.
    callback = keras.callbacks.ModelCheckpoint(str(tmp_path / "{epoch:02d}-{val_acc:.3f}.keras"))
    with pytest.raises(KeyError, match="val_acc"):
        compiled_model().fit(*tiny_data, callbacks=[callback], **FIT)


def test_a_step_save_placeholder_the_batch_logs_lack_fails_at_the_first_batch(tmp_path, tiny_data):
    epochs = Epochs()
    saver = ModelCheckpoint(tmp_path / "{step}-{val_loss:.3f}.keras", save_freq=100)
    with pytest.raises(
        ConfigError,
        match=r"the placeholder \{val_loss\} names a key the batch logs do not have; "
        r"did you mean \{loss\}\? \(validation metrics exist only at epoch ends: "
        r"use save_freq='epoch'\) Available keys: accuracy, batch, epoch, loss, step$",
    ):
        run([saver, epochs], *tiny_data)
    assert epochs.begun == 1 and not list(tmp_path.glob("*.keras"))  # long before the first save (step 100)


def test_an_unnamed_placeholder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="every placeholder needs a name"):
        ModelCheckpoint(tmp_path / "{}-{epoch}.keras")


@pytest.mark.parametrize("via", ["engine", "model_fit"])
def test_a_missing_monitor_warns_and_saves_as_keras_does(tmp_path, tiny_data, via, caplog):
    """Keras's ModelCheckpoint(save_best_only=True) with a monitor the logs lack warns and saves
    every epoch (with mode='auto' Keras cannot even start: it cannot infer the direction of a
    metric it does not know); so does ours, naming the close match, on the same run."""
    keras_dir, ours_dir = tmp_path / "keras", tmp_path / "ours"
    callback = keras.callbacks.ModelCheckpoint(
        str(keras_dir / "{epoch:02d}.keras"), monitor="val_acc", mode="max", save_best_only=True
    )
    with pytest.warns(UserWarning, match="Can save best model only with val_acc available"):
        compiled_model().fit(*tiny_data, callbacks=[callback], **FIT)

    with caplog.at_level("WARNING", logger="corebus"):
        run(
            [ModelCheckpoint(ours_dir / "{epoch:02d}.keras", monitor="val_acc", mode="max", save_best_only=True)],
            *tiny_data,
            via=via,
        )
    assert files(ours_dir) == files(keras_dir) == [f"{e:02d}.keras" for e in range(1, FIT["epochs"] + 1)]
    (warning,) = [r.getMessage() for r in caplog.records if "val_acc" in r.getMessage()]  # once, not per epoch
    assert "monitor='val_acc' is not in the logs (did you mean monitor='val_accuracy'?)" in warning


def test_unwritable_directory_fails_before_any_step(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write to"):
        ModelCheckpoint(tmp_path / "a_file" / "ckpt" / "{epoch}.keras")
    with pytest.raises(ConfigError, match="cannot write to"):
        make_trainer([{"name": "checkpoint", "filepath": str(tmp_path / "a_file" / "m.keras")}])


# ------------------------------------------------------------------------- events and resume


def test_checkpoint_saved_event_is_the_same_in_both_modes(tmp_path, tiny_data):
    x, y = tiny_data
    runs = iter(["engine", "model_fit"])

    def plugins():
        return [ModelCheckpoint(tmp_path / next(runs) / "{epoch}-{val_loss:.4f}.keras"), Saved()]

    (engine, _), (in_fit, history) = corebus.testing.fit_both_ways(
        plugins, x, y, batch_size=16, epochs=3, validation_split=0.25
    )
    for plugins_run, folder in ((engine, "engine"), (in_fit, "model_fit")):
        events = plugins_run[1].events
        assert [e[0] for e in events] == [str(tmp_path / folder / f) for f in files(tmp_path / folder)]
        steps = -(-72 // 16)  # 96 samples, 72 after the validation split, 16 per batch
        assert [(e[1], e[4]) for e in events] == [(steps, steps), (2 * steps, 2 * steps), (3 * steps, 3 * steps)]
        assert all(exists for *_, exists, _ in events)
        assert [e[2] for e in events] == [
            {"kind": "model", "monitor": "val_loss", "value": pytest.approx(v, rel=1e-4), "epoch": e, "last": False}
            for e, v in enumerate(history.history["val_loss"])
        ]
    assert files(tmp_path / "engine") == files(tmp_path / "model_fit")


def test_resumed_run_continues_from_state_dict(tmp_path, tiny_data):
    x, y = tiny_data

    def plugins(folder):
        return [
            ModelCheckpoint(tmp_path / folder / "best.keras", save_best_only=True),
            ModelCheckpoint(tmp_path / folder / "{epoch:02d}.keras", save_top_k=2),
        ]

    straight = plugins("straight")
    make_trainer(straight, optimizer=keras.optimizers.SGD(LR)).fit(x, y, **FIT)

    first = plugins("resumed")
    trainer = make_trainer(first, optimizer=keras.optimizers.SGD(LR))
    history = trainer.fit(x, y, **{**FIT, "epochs": 4})
    # The run is split where the best so far is behind it: a fresh instance would overwrite
    # best.keras with the worse epoch 5.
    assert min(history.history["val_loss"]) == history.history["val_loss"][-1]
    states = json.loads(json.dumps([p.state_dict() for p in first]))
    second = plugins("resumed")
    for plugin, state in zip(second, states):
        plugin.load_state_dict(state)
    trainer._plugins = [(f"checkpoint{i}", p) for i, p in enumerate(second)]
    trainer.fit(x, y, **{**FIT, "initial_epoch": 4})

    assert files(tmp_path / "resumed") == files(tmp_path / "straight")
    for plugin, reference in zip(second, straight):
        assert plugin.best == pytest.approx(reference.best, rel=1e-6)
        assert [os.path.basename(p) for p, _ in plugin._top_k] == [os.path.basename(p) for p, _ in reference._top_k]
    for name in files(tmp_path / "straight"):
        assert_same_arrays(
            keras.saving.load_model(tmp_path / "resumed" / name).get_weights(),
            keras.saving.load_model(tmp_path / "straight" / name).get_weights(),
            rtol=1e-6,
            atol=1e-7,
        )
    restored = ModelCheckpoint(tmp_path / "resumed" / "{epoch}.keras", save_top_k=2)
    restored.load_state_dict(second[1].state_dict())
    assert restored.state_dict() == second[1].state_dict()
    # a state naming files of another directory is refused: its top-k files would be deleted
    with pytest.raises(ValueError, match="outside this checkpoint's directory"):
        ModelCheckpoint(tmp_path / "x" / "{epoch}.keras", save_top_k=2).load_state_dict(second[1].state_dict())


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def test_background_falls_back_to_the_training_thread_when_the_model_cannot_be_copied(tmp_path, tiny_data, caplog):
    x, y = tiny_data
    weights = WeightsAt()
    plugin = ModelCheckpoint(tmp_path / "{step}.weights.h5", save_weights_only=True, background=True)
    keras.utils.set_random_seed(0)
    trainer = corebus.Trainer(
        Subclassed(), optimizer="sgd", loss="sparse_categorical_crossentropy", plugins=[weights, plugin], seed=0
    )
    trainer.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert "saving on the training thread instead" in caplog.text
    assert files(tmp_path) == ["12.weights.h5", "6.weights.h5"]
    for step in (6, 12):
        restored = Subclassed()
        restored(x[:1])
        restored.load_weights(tmp_path / f"{step}.weights.h5")
        assert_same_arrays(restored.get_weights(), weights.by_step[step], rtol=0, atol=0)
