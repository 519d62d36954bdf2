"""The progress bar: Keras's Progbar with an ETA, width-aware redraws, plain lines off a terminal."""

import io
import re
import time
import types
from collections.abc import Mapping

import keras
import pytest

from corebus import hookimpl
from corebus.plugins.progress import ProgressBar
from corebus.testing import make_trainer, tiny_data, tiny_model

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Terminal(io.StringIO):
    """A stream that says it is a terminal (of the default 80 columns: it has no fileno)."""

    def isatty(self):
        return True


class Slow:
    """Makes each step take ``seconds``, so the bar has a measurable ETA."""

    def __init__(self, seconds):
        self.seconds = seconds

    @hookimpl
    def on_train_batch_end(self):
        time.sleep(self.seconds)


def wide_metrics():
    # Long names: together with the bar they are wider than an 80-column terminal.
    return [
        "accuracy",
        keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="a_rather_long_top_two_accuracy"),
        keras.metrics.SparseCategoricalCrossentropy(name="another_long_crossentropy_name"),
    ]


def redraws(text):
    """Each drawn line as the terminal shows it: escape codes out, split at carriage returns."""
    return [ANSI.sub("", part).replace("\b", "").rstrip() for part in re.split(r"[\r\n]", text) if part.strip("\b ")]


def test_live_bar_on_a_terminal_shows_an_eta_and_fits_80_columns():
    x, y = tiny_data(n=96)
    stream = Terminal()
    trainer = make_trainer([ProgressBar(interval=0.0, stream=stream), Slow(0.05)], metrics=wide_metrics())
    started = time.monotonic()
    trainer.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert time.monotonic() - started > 1.2
    lines = redraws(stream.getvalue())
    live = [line for line in lines if re.match(r"\s*\d+/24 ", line) and not line.lstrip().startswith("24/24")]
    # The time shown while the epoch runs goes down (the time left, not the time spent).
    shown = [int(re.search(r" (\d+)s \d+m?s/step", line).group(1)) for line in live[1:]]
    assert shown[0] >= 1 and shown[-1] == 0 and shown == sorted(shown, reverse=True), shown
    assert all(len(line) <= 79 for line in live), max(live, key=len)
    assert any("loss" in line for line in live)
    final = lines[-1]
    for name in ("accuracy", "a_rather_long_top_two_accuracy", "another_long_crossentropy_name", "loss"):
        assert f"{name}:" in final  # the epoch's last line shows every metric
    assert "\r" in stream.getvalue()  # redrawn in place


def test_off_a_terminal_the_output_is_plain_lines_as_keras_verbose_2():
    x, y = tiny_data(n=48)
    stream = io.StringIO()
    make_trainer([ProgressBar(interval=0.0, stream=stream)]).fit(x, y, batch_size=16, epochs=2, verbose=0)
    text = stream.getvalue()
    assert not set("\r\b\x1b") & set(text)
    ours = text.splitlines()

    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    buffer = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buffer):
        model.fit(x, y, batch_size=16, epochs=2, verbose=2, shuffle=False)
    theirs = buffer.getvalue().splitlines()

    def shape(line):  # numbers and metric order aside, the same lines as Keras's verbose=2
        return sorted(re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", line).split(" - "))

    assert [shape(line) for line in ours] == [shape(line) for line in theirs]
    assert ours[0] == "Epoch 1/2" and ours[1].startswith("3/3 - ")


class CountingLogs(Mapping):
    def __init__(self):
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return 0.5

    def __iter__(self):
        self.reads += 1
        return iter(["loss"])

    def __len__(self):
        return 1


def test_the_logs_are_read_only_at_a_redraw():
    bar = ProgressBar(interval=3600, stream=Terminal())
    bar.on_train_begin(trainer=types.SimpleNamespace(params={"epochs": 1, "steps": 1000, "verbose": 1}))
    bar.on_epoch_begin(epoch=0)
    logs = CountingLogs()
    for batch in range(1000):
        bar.on_train_batch_end(batch=batch, logs=logs)
    assert logs.reads == 0  # no host sync between redraws
    bar.on_epoch_end(logs=logs)
    assert logs.reads > 0


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_redraws_fit_the_terminal_width(columns, monkeypatch):
    stream = Terminal()
    bar = ProgressBar(interval=0.0, stream=stream)
    monkeypatch.setattr(bar, "_columns", lambda: columns)
    bar.on_train_begin(trainer=types.SimpleNamespace(params={"epochs": 1, "steps": 500, "verbose": 1}))
    bar.on_epoch_begin(epoch=0)
    logs = {f"metric_number_{i}": 0.1234 * i for i in range(12)}
    for batch in range(0, 499, 50):
        bar.on_train_batch_end(batch=batch, logs=logs)
    live = redraws(stream.getvalue())
    assert live and all(len(line) < columns for line in live)
    assert "metric_number_0" in live[-1] or columns < 60
