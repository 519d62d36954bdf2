"""TensorBoardLogger: real event files, read back with TensorBoard's own EventAccumulator and
compared with the run's history and with what ``keras.callbacks.TensorBoard`` writes."""

import json
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import corebus
from corebus import ConfigError, LazyLogs, MissingExtraError, hookimpl, read_spool
from corebus.app.cli import main as cli_main
from corebus.integrations import TensorBoardLogger
from corebus.plugins import GradientAccumulation
from corebus.testing import make_trainer, tiny_data, tiny_model

FIT = dict(batch_size=16, verbose=0, shuffle=False, validation_split=0.25)  # 72 train samples: 5 steps/epoch


def read_run(directory):
    """``{tag: [(step, value), ...]}`` of every event file in ``directory``, and the graph node count."""
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    events = {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        rows = []
        for event in acc.Tensors(tag):
            value = tf.make_ndarray(event.tensor_proto)
            if plugin in ("scalars",):
                value = value.item()
            elif plugin in ("text", "graph_keras_model"):
                value = value.item().decode() if value.ndim == 0 else value.reshape(-1)[0].decode()
            rows.append((event.step, value))
        events[tag] = (plugin, rows)
    graph_nodes = len(acc.Graph().node) if acc.Tags()["graph"] else 0
    return events, graph_nodes


def scalars(events):
    return {tag: rows for tag, (plugin, rows) in events.items() if plugin == "scalars"}


class StepRecorder:
    """Records (previous_global_step, global_step, batch logs) of every train call."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def on_log(self, trainer, kind, step, logs):
        if kind == "batch":
            self.calls.append((trainer.previous_global_step, step, {k: float(v) for k, v in logs.items()}))


def compiled(steps_per_execution=1):
    model = tiny_model()
    model.compile(
        optimizer="sgd",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def f32(value):
    return float(np.float32(value))


# ------------------------------------------------------------------ Keras is the oracle


def test_same_tags_steps_and_values_as_keras_tensorboard(tmp_path):
    """One model.fit with both callbacks: every summary Keras writes, ours writes identically."""
    x, y = tiny_data()
    ours = TensorBoardLogger(tmp_path / "ours", histogram_freq=1, update_freq=1)
    keras_tb = keras.callbacks.TensorBoard(str(tmp_path / "keras"), histogram_freq=1, update_freq=1)
    compiled().fit(x, y, epochs=2, callbacks=[keras_tb, corebus.KerasCallback([ours])], **FIT)

    for run in ("train", "validation"):
        expected, _ = read_run(tmp_path / "keras" / run)
        got, _ = read_run(tmp_path / "ours" / run)
        assert expected, f"keras wrote nothing in {run}"
        for tag, (plugin, rows) in expected.items():
            assert tag in got, f"{run}/{tag} missing"
            assert got[tag][0] == plugin
            assert [step for step, _ in got[tag][1]] == [step for step, _ in rows], f"{run}/{tag} steps"
            for (_, mine), (_, theirs) in zip(got[tag][1], rows):
                if plugin == "histograms":
                    np.testing.assert_allclose(mine, theirs, rtol=1e-12)
                else:
                    assert mine == theirs, f"{run}/{tag}"
        extra = set(got) - set(expected)
        if run == "train":
            # what Keras lacks: weight norms beside each histogram, the per-step learning rate,
            # run params and final status
            norms = {t.replace("/histogram", "/norm") for t in expected if t.endswith("/histogram")}
            # and gradients: KerasCallback runs the gradient pipeline in model.fit
            gradients = {
                t.replace("/histogram", f"/gradient_{kind}")
                for t in expected
                if t.endswith("/histogram")
                for kind in ("histogram", "norm")
            }
            assert extra == norms | gradients | {"batch_learning_rate", "run_params", "run_status"}
            batch_steps = [step for step, _ in scalars(got)["batch_loss"]]
            assert scalars(got)["batch_learning_rate"] == [(step, f32(0.01)) for step in batch_steps]
        else:
            assert extra == set()
    keras_tags = set(read_run(tmp_path / "keras" / "train")[0])
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate", "batch_loss", "keras"} <= keras_tags


# ------------------------------------------------------------------ history, step axis, cadence


def run_both(mode, plugins, steps_per_execution, epochs=3):
    x, y = tiny_data()
    if mode == "engine":
        trainer = make_trainer(plugins, steps_per_execution=steps_per_execution)
        return trainer.fit(x, y, epochs=epochs, **FIT)
    model = compiled(steps_per_execution)
    return model.fit(x, y, epochs=epochs, callbacks=[corebus.KerasCallback(plugins)], **FIT)


@pytest.mark.parametrize("update_freq", [2, 4])
@pytest.mark.parametrize("mode", ["engine", "keras"])
def test_event_files_hold_the_run_history_at_the_right_steps(tmp_path, mode, update_freq):
    logger, recorder = TensorBoardLogger(tmp_path, update_freq=update_freq, histogram_freq=1), StepRecorder()
    fetches = LazyLogs.fetches
    history = run_both(mode, [logger, recorder], steps_per_execution=3)
    fetches = LazyLogs.fetches - fetches
    train, graph_nodes = read_run(tmp_path / "train")
    validation, _ = read_run(tmp_path / "validation")
    epochs = history.epoch
    assert epochs == [0, 1, 2]

    # epoch metrics: Keras's tags, step = epoch, values = history
    for name in ("loss", "accuracy"):
        assert scalars(train)[f"epoch_{name}"] == [(e, f32(history.history[name][e])) for e in epochs]
        assert scalars(validation)[f"epoch_{name}"] == [(e, f32(history.history[f"val_{name}"][e])) for e in epochs]
    assert scalars(train)["epoch_learning_rate"] == [(e, f32(0.01)) for e in epochs]
    assert "epoch_steps_per_second" not in train  # write_steps_per_second=False, as Keras

    # 5 steps per epoch in calls of 3 + 2: global steps 3, 5, 8, 10, 13, 15...
    steps = [step for _, step, _ in recorder.calls]
    assert steps == [3, 5, 8, 10, 13, 15]
    due = [
        (step, logs)
        for prev, step, logs in recorder.calls
        if any(s % update_freq == 0 for s in range(prev + 1, step + 1))
    ]  # a multiple of N crossed
    assert scalars(train)["batch_loss"] == [(step, f32(logs["loss"])) for step, logs in due]
    assert scalars(train)["batch_accuracy"] == [(step, f32(logs["accuracy"])) for step, logs in due]
    assert fetches == len(recorder.calls)  # the recorder reads every call; the logger adds no fetch

    # validation after every epoch at the global step reached
    epoch_end_steps = [5, 10, 15]
    assert scalars(validation)["evaluation_loss_vs_iterations"] == [
        (s, f32(history.history["val_loss"][e])) for e, s in zip(epochs, epoch_end_steps)
    ]

    # histograms of every weight each epoch, counts covering the whole weight
    model = history.model
    for layer in model.layers:
        for weight in layer.weights:
            plugin, rows = train[f"{weight.path}/histogram"]
            assert plugin == "histograms" and [s for s, _ in rows] == epochs
            assert all(b.shape == (30, 3) and b[:, 2].sum() == np.prod(weight.shape) for _, b in rows)
            norms = scalars(train)[f"{weight.path}/norm"]
            assert norms[-1] == (2, f32(np.linalg.norm(weight.numpy())))

    # graphs and run metadata
    assert graph_nodes > 0 and train["keras"][1][0][1] == model.to_json()
    assert json.loads(train["run_params"][1][0][1].strip("`\n"))["fit"]["epochs"] == 3
    assert train["run_status"][1] == [(15, "FINISHED")]


def test_batch_logs_are_read_only_when_due(tmp_path):
    logger = TensorBoardLogger(tmp_path, update_freq=4)
    fetches = LazyLogs.fetches
    run_both("engine", [logger], steps_per_execution=1, epochs=2)
    # steps 1..10, due at 4 and 8 only: each reads its step's values and, for the step's own
    # accuracy, the running means of the step before; nothing else read the logs
    assert LazyLogs.fetches - fetches == 4
    assert [s for s, _ in scalars(read_run(tmp_path / "train")[0])["batch_loss"]] == [4, 8]


def test_per_step_hooks_are_subscribed_only_when_a_profiler_window_or_gradient_histograms_need_them(tmp_path):
    def per_step_hooks(**options):
        bus = corebus.PluginBus([("tensorboard", TensorBoardLogger(tmp_path, **options))])
        return [hook for hook in ("on_train_batch_begin", "on_train_batch_end") if bus.implementations(hook)]

    both = ["on_train_batch_begin", "on_train_batch_end"]
    assert per_step_hooks(profile_batch=(2, 3)) == both and per_step_hooks(histogram_freq=1) == both
    assert per_step_hooks() == [] and per_step_hooks(histogram_freq=1, write_gradients=False) == []


def test_update_freq_epoch_writes_no_batch_metrics_and_standalone_evaluate_is_logged(tmp_path):
    x, y = tiny_data()
    trainer = make_trainer([TensorBoardLogger(tmp_path, write_graph=False, write_steps_per_second=True)])
    trainer.fit(x, y, epochs=1, **FIT)
    result = trainer.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    train, graph_nodes = read_run(tmp_path / "train")
    assert not [tag for tag in train if tag.startswith("batch_")] and graph_nodes == 0 and "keras" not in train
    [(step, rate)] = scalars(train)["epoch_steps_per_second"]
    assert step == 0 and rate > 0
    evaluation = scalars(read_run(tmp_path / "validation")[0])["evaluation_loss_vs_iterations"]
    assert evaluation[-1] == (trainer.global_step, f32(result["loss"])) and len(evaluation) == 2


# ------------------------------------------------------------------ never block, never lose


def test_unwritable_event_dir_spools_and_corebus_sync_replays_it(tmp_path, caplog):
    x, y = tiny_data()
    (tmp_path / "train").write_text("a file where the train/ directory should be")
    logger = TensorBoardLogger(tmp_path, update_freq=2, shutdown_timeout=1.0)
    start = time.perf_counter()
    history = make_trainer([logger]).fit(x, y, epochs=2, **FIT)  # training is not disturbed
    assert time.perf_counter() - start < 20
    spool = tmp_path / "tensorboard.spool.jsonl"
    header, records = read_spool(spool)
    assert header["plugin"] == "tensorboard" and header["config"]["log_dir"] == str(tmp_path)
    assert records and "corebus sync" in caplog.text

    (tmp_path / "train").unlink()
    assert cli_main(["sync", str(tmp_path)]) == 0
    assert not spool.exists()  # delivered once: a second sync has nothing to replay
    train = scalars(read_run(tmp_path / "train")[0])
    assert train["epoch_loss"] == [(e, f32(history.history["loss"][e])) for e in (0, 1)]
    assert [s for s, _ in train["batch_loss"]] == [2, 4, 6, 8, 10]
    assert scalars(read_run(tmp_path / "validation")[0])["epoch_loss"][-1] == (1, f32(history.history["val_loss"][1]))


# ------------------------------------------------------------------ resume and final status


def test_resumed_run_continues_in_the_same_log_dir(tmp_path):
    from corebus.plugins import BackupAndRestore

    x, y = tiny_data()
    straight_dir, run_dir, backup = tmp_path / "straight", tmp_path / "run", tmp_path / "backup"
    straight = make_trainer([TensorBoardLogger(straight_dir, update_freq=1)]).fit(x, y, epochs=3, **FIT)

    class CrashAt7:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 7:
                raise RuntimeError("power cut")

    first = TensorBoardLogger(run_dir, update_freq=1)
    with pytest.raises(corebus.PluginError, match="power cut"):
        make_trainer([BackupAndRestore(str(backup), background=False), first, CrashAt7()]).fit(x, y, epochs=3, **FIT)
    state = json.loads(json.dumps(first.state_dict()))

    # a fresh logger built with another log_dir: the snapshot brings it back to the run's
    resumed = TensorBoardLogger(tmp_path / "elsewhere", update_freq=1)
    make_trainer([BackupAndRestore(str(backup), background=False), resumed]).fit(x, y, epochs=3, **FIT)
    assert resumed.state_dict() == state and resumed.log_dir == str(run_dir)
    assert not (tmp_path / "elsewhere" / "train").exists()

    got, want = scalars(read_run(run_dir / "train")[0]), scalars(read_run(straight_dir / "train")[0])
    assert [s for s, _ in got["epoch_loss"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in got["epoch_loss"]], [v for _, v in want["epoch_loss"]], rtol=1e-6)
    # steps 1..6 before the crash (step 7 raised before on_log), then from the snapshot (end of
    # epoch 0, step 5) on: step 6, already in the event files, is not written twice
    assert [s for s, _ in got["batch_loss"]] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    statuses = read_run(run_dir / "train")[0]["run_status"][1]
    failed = "FAILED (PluginError: plugin 'CrashAt7' failed in on_train_batch_end: RuntimeError: power cut)"
    assert statuses == [(7, failed), (15, "FINISHED")]
    assert straight.history["loss"][-1] == pytest.approx(got["epoch_loss"][-1][1], rel=1e-6)


def test_keyboard_interrupt_is_recorded_as_killed(tmp_path):
    class Interrupt:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    x, y = tiny_data()
    with pytest.raises(KeyboardInterrupt):
        make_trainer([TensorBoardLogger(tmp_path), Interrupt()]).fit(x, y, epochs=1, **FIT)
    assert read_run(tmp_path / "train")[0]["run_status"][1] == [(2, "KILLED")]


def test_checkpoints_are_listed(tmp_path):
    from corebus.plugins import ModelCheckpoint

    x, y = tiny_data()
    path = tmp_path / "ckpt" / "model.weights.h5"
    make_trainer([ModelCheckpoint(str(path), save_weights_only=True), TensorBoardLogger(tmp_path / "tb")]).fit(
        x, y, epochs=2, **FIT
    )
    rows = read_run(tmp_path / "tb" / "train")[0]["checkpoints"][1]
    assert [s for s, _ in rows] == [5, 10] and all(str(path) in text for _, text in rows)


# ------------------------------------------------------------------ profiler


@pytest.mark.parametrize(
    "steps_per_execution, window, covered",
    [(1, (2, 3), (2, 3)), (3, (4, 5), (4, 5)), (3, 2, (1, 3))],  # calls of 3 + 2 steps: rounded out to calls
)
def test_profiler_runs_over_the_global_step_window(tmp_path, steps_per_execution, window, covered):
    logger = TensorBoardLogger(tmp_path, profile_batch=window, write_graph=False)
    run_both("engine", [logger], steps_per_execution=steps_per_execution, epochs=1)
    assert logger.profiled_steps == covered
    assert list((tmp_path / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    tf.profiler.experimental.start(str(tmp_path / "after"))  # the logger stopped its profiler
    tf.profiler.experimental.stop(save=False)


# ------------------------------------------------------------------ configuration


def test_bad_configuration_fails_at_construction(tmp_path):
    for kwargs, match in [
        ({"update_freq": 0}, "update_freq"),
        ({"update_freq": "sometimes"}, "update_freq"),
        ({"histogram_freq": -1}, "histogram_freq"),
        ({"profile_batch": (3, 2)}, "profile_batch"),
        ({"profile_batch": "a,b"}, "profile_batch"),
    ]:
        with pytest.raises(ConfigError, match=match):
            TensorBoardLogger(tmp_path, **kwargs)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write to"):
        TensorBoardLogger(tmp_path / "file" / "logs")
    assert TensorBoardLogger(tmp_path, update_freq="batch").update_freq == 1


def test_missing_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingExtraError, match=r'pip install "corebus\[tensorboard\]"'):
        TensorBoardLogger()


# ------------------------------------------------------------------ gradients from the pipeline


class WeightSteps:
    """Every trainable weight before and after each update (SGD: gradient = -delta / lr)."""

    def __init__(self):
        self.snapshots = []

    @hookimpl
    def on_train_batch_begin(self, trainer):
        self.snapshots.append([np.asarray(w, np.float64) for w in trainer.model.trainable_weights])

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.snapshots.append([np.asarray(w, np.float64) for w in trainer.model.trainable_weights])


@pytest.mark.parametrize("mode", ["engine", "model.fit"])
def test_gradient_histograms_and_norms_are_the_epochs_last_update(tmp_path, mode):
    x, y = tiny_data()
    lr, spy = 0.1, WeightSteps()
    logger = TensorBoardLogger(tmp_path, histogram_freq=1, update_freq=1, write_grad_norm=True)
    fit = dict(batch_size=16, verbose=0, shuffle=False, epochs=2)  # 96 samples: 6 steps per epoch
    if mode == "engine":
        trainer = make_trainer([spy, logger], optimizer=keras.optimizers.SGD(lr))
        trainer.fit(x, y, **fit)
        model = trainer.model
    else:
        callback = corebus.KerasCallback([spy, logger])
        model = tiny_model()
        model.compile(
            optimizer=callback.wrap_optimizer(keras.optimizers.SGD(lr)),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        model.fit(x, y, callbacks=[callback], **fit)
    train = read_run(tmp_path / "train")[0]
    for epoch in range(2):
        before, after = spy.snapshots[epoch * 12 + 10], spy.snapshots[epoch * 12 + 11]  # the epoch's last step
        for weight, old, new in zip(model.trainable_weights, before, after):
            gradient = (old - new) / lr
            plugin, rows = train[f"{weight.path}/gradient_histogram"]
            assert plugin == "histograms" and rows[epoch][0] == epoch
            assert rows[epoch][1][:, 2].sum() == gradient.size
            np.testing.assert_allclose(rows[epoch][1][:, :2].min(), gradient.min(), rtol=1e-4, atol=1e-7)
            norm = dict(scalars(train)[f"{weight.path}/gradient_norm"])[epoch]
            assert norm == pytest.approx(np.linalg.norm(gradient), rel=1e-4)
    # the global norm of every update, at the global step
    steps = scalars(train)["batch_grad_norm"]
    assert [s for s, _ in steps] == list(range(1, 13))
    expected = [
        np.sqrt(sum(np.sum(((a - b) / lr) ** 2) for a, b in zip(spy.snapshots[2 * i], spy.snapshots[2 * i + 1])))
        for i in range(12)
    ]
    np.testing.assert_allclose([v for _, v in steps], expected, rtol=1e-4)


def test_write_gradients_false_adds_no_tap(tmp_path):
    logger = TensorBoardLogger(tmp_path, histogram_freq=1, update_freq=1, write_gradients=False)
    assert logger.gradient_taps == set()
    trainer = make_trainer([logger])
    trainer.fit(*tiny_data(), batch_size=32, epochs=1, verbose=0)
    train = read_run(tmp_path / "train")[0]
    assert not [t for t in train if "grad" in t]


def test_scalars_are_the_bytes_tensorboard_writes():
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb

    from corebus.integrations.tensorboard_events import scalar_value

    for number in (0.5, 1e-7, -2.0, 1e30, 123456789.123, 0.0, float("inf"), float("nan")):
        assert (
            scalar_value("batch_loss", number).SerializeToString()
            == scalar_pb("batch_loss", number).value[0].SerializeToString()
        )


@pytest.mark.parametrize("mode", ["engine", "model.fit"])
def test_gradient_histograms_with_accumulation_are_written_every_due_epoch(tmp_path, mode):
    # 6 micro-batches per epoch, an update every 4: epochs 0 and 2 end inside an accumulation
    # window (their last updates are micro-batches 4 and 16), epochs 1 and 3 on an update.
    x, y = tiny_data()
    lr, spy = 0.1, WeightSteps()
    logger = TensorBoardLogger(tmp_path, histogram_freq=1, update_freq="epoch")
    plugins = [spy, logger, GradientAccumulation(4)]
    fit = dict(batch_size=16, verbose=0, shuffle=False, epochs=4)  # 96 samples: 6 micro-batches per epoch
    if mode == "engine":
        trainer = make_trainer(plugins, optimizer=keras.optimizers.SGD(lr))
        trainer.fit(x, y, **fit)
        model = trainer.model
    else:
        callback = corebus.KerasCallback(plugins)
        model = tiny_model()
        model.compile(
            optimizer=callback.wrap_optimizer(keras.optimizers.SGD(lr)),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        model.fit(x, y, callbacks=[callback], **fit)
    train = read_run(tmp_path / "train")[0]
    for epoch, micro in enumerate((4, 12, 16, 24)):  # each epoch's last update, 1-based micro-batch
        before, after = spy.snapshots[2 * micro - 2], spy.snapshots[2 * micro - 1]
        for weight, old, new in zip(model.trainable_weights, before, after):
            gradient = (old - new) / lr
            plugin, rows = train[f"{weight.path}/gradient_histogram"]
            assert [step for step, _ in rows] == [0, 1, 2, 3]
            assert rows[epoch][1][:, 2].sum() == gradient.size
            np.testing.assert_allclose(rows[epoch][1][:, :2].min(), gradient.min(), rtol=1e-4, atol=1e-7)
            norm = dict(scalars(train)[f"{weight.path}/gradient_norm"])[epoch]
            assert norm == pytest.approx(np.linalg.norm(gradient), rel=1e-4)
