"""CSVLogger against keras.callbacks.CSVLogger: the same file for the same run."""

import csv
import json

import keras
import numpy as np
import pytest

import corebus
from corebus import ConfigError, hookimpl
from corebus.plugins.csv_logger import CSVLogger
from corebus.testing import make_trainer, tiny_data, tiny_model

FIT = dict(batch_size=16, shuffle=False, verbose=0)


def compiled(optimizer="sgd"):
    model = tiny_model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def keras_csv(path, fits, **logger_kwargs):
    """Run model.fit once per entry of ``fits`` (fit kwargs) with keras's CSVLogger."""
    x, y = tiny_data()
    model = compiled()
    for fit_kwargs in fits:
        model.fit(x, y, callbacks=[keras.callbacks.CSVLogger(str(path), **logger_kwargs)], **FIT, **fit_kwargs)
    return path.read_bytes()


def adapter_csv(path, fits, **logger_kwargs):
    x, y = tiny_data()
    model = compiled()
    for fit_kwargs in fits:
        callback = corebus.KerasCallback([CSVLogger(path, **logger_kwargs)])
        model.fit(x, y, callbacks=[callback], **FIT, **fit_kwargs)
    return path.read_bytes()


def engine_csv(path, fits, **logger_kwargs):
    x, y = tiny_data()
    trainer = make_trainer([CSVLogger(path, **logger_kwargs)])  # one instance reused, as Keras allows
    for fit_kwargs in fits:
        trainer.fit(x, y, **FIT, **fit_kwargs)
    return path.read_bytes()


def parsed(content, separator=","):
    rows = list(csv.reader(content.decode().splitlines(), delimiter=separator))
    return rows[0], rows[1:]


def assert_same_values(ours, theirs, separator=","):
    (our_header, our_rows), (their_header, their_rows) = parsed(ours, separator), parsed(theirs, separator)
    assert our_header == their_header
    assert len(our_rows) == len(their_rows)
    for a, b in zip(our_rows, their_rows):
        assert a[0] == b[0]  # epoch
        assert [v == "NA" for v in a] == [v == "NA" for v in b]
        np.testing.assert_allclose(
            [float(v) for v in a[1:] if v != "NA"], [float(v) for v in b[1:] if v != "NA"], rtol=1e-5, atol=1e-6
        )


RUNS = {
    "validation": (dict(), [dict(epochs=3, validation_split=0.25)]),
    "no_validation_na_columns": (dict(), [dict(epochs=2)]),
    "separator": (dict(separator=";"), [dict(epochs=2, validation_split=0.25)]),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_same_file_as_keras(tmp_path, name):
    kwargs, fits = RUNS[name]
    theirs = keras_csv(tmp_path / "keras.csv", fits, **kwargs)
    assert theirs.count(b"\r\n") == 1 + sum(f["epochs"] for f in fits)
    assert adapter_csv(tmp_path / "adapter.csv", fits, **kwargs) == theirs
    engine = engine_csv(tmp_path / "engine.csv", fits, **kwargs)
    assert engine.splitlines()[0] == theirs.splitlines()[0]  # header, byte for byte
    assert_same_values(engine, theirs, kwargs.get("separator", ","))


@pytest.mark.parametrize("append", [True, False])
def test_append_like_keras(tmp_path, append):
    fits = [dict(epochs=2, validation_split=0.25), dict(epochs=3, initial_epoch=2, validation_split=0.25)]
    theirs = keras_csv(tmp_path / "keras.csv", fits, append=append)
    ours = adapter_csv(tmp_path / "adapter.csv", fits, append=append)
    assert ours == theirs
    assert_same_values(engine_csv(tmp_path / "engine.csv", fits, append=append), theirs)
    header, rows = parsed(ours)
    assert header[0] == "epoch" and [r[0] for r in rows] == (["0", "1", "2"] if append else ["2"])


def test_flushed_after_every_epoch(tmp_path):
    path = tmp_path / "log.csv"
    seen = []

    class ReadsTheFile:
        @hookimpl(trylast=True)
        def on_epoch_end(self, epoch):
            seen.append(path.read_text().count("\n"))

    x, y = tiny_data(n=32)
    make_trainer([CSVLogger(path), ReadsTheFile()]).fit(x, y, epochs=3, **FIT)
    assert seen == [2, 3, 4]  # header + one row per finished epoch, visible while training runs


def test_unwritable_path_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write"):
        CSVLogger(blocker / "log.csv")  # its parent is a file
    with pytest.raises(ConfigError, match="is a directory"):
        CSVLogger(tmp_path)
    with pytest.raises(ConfigError, match="separator"):
        CSVLogger(tmp_path / "log.csv", separator=";;")
    nested = tmp_path / "new" / "dir" / "log.csv"
    CSVLogger(nested)  # a missing parent directory is created, not an error
    assert nested.parent.is_dir()


def test_resume_from_a_snapshot_writes_the_uninterrupted_file(tmp_path):
    x, y = tiny_data()
    whole_path, path = tmp_path / "whole.csv", tmp_path / "resumed.csv"
    fit = dict(FIT, validation_split=0.25)
    compiled().fit(x, y, epochs=4, callbacks=[corebus.KerasCallback([CSVLogger(whole_path)])], **fit)

    snapshot = {}

    class Snapshot:
        @hookimpl(trylast=True)
        def on_epoch_end(self, trainer, epoch):
            if epoch == 1:
                snapshot["weights"] = trainer.model.get_weights()
                snapshot["state"] = json.loads(json.dumps(logger.state_dict()))

    # the run is snapshotted after epoch 1, writes epoch 2's row, then dies
    logger = CSVLogger(path)
    compiled().fit(x, y, epochs=3, callbacks=[corebus.KerasCallback([logger, Snapshot()])], **fit)
    assert parsed(path.read_bytes())[1][-1][0] == "2"

    resumed = CSVLogger(path)  # append=False: the resume must still keep the earlier rows
    resumed.load_state_dict(snapshot["state"])
    model = compiled()
    model.set_weights(snapshot["weights"])
    model.fit(x, y, epochs=4, initial_epoch=2, callbacks=[corebus.KerasCallback([resumed])], **fit)
    assert path.read_bytes() == whole_path.read_bytes()
