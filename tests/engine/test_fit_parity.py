"""Drop-in for model.fit: the same arguments, Keras callbacks and seeds give model.fit's results.

Every test runs ``model.fit`` and ``corebus.Trainer(model).fit`` on the same data from the same
initial weights, in the test, and compares what they produce.
"""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError
from corebus.testing import tiny_data

X, Y = tiny_data(n=96, features=4, classes=3)


def model(seed: int = 0, compile_kwargs: dict | None = None, metrics=("accuracy",)) -> keras.Model:
    keras.utils.set_random_seed(seed)
    m = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3, activation="softmax")]
    )
    m.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss="sparse_categorical_crossentropy",
        metrics=list(metrics),
        **(compile_kwargs or {}),
    )
    return m


def both(fit_kwargs: dict, make=model, callbacks=None):
    """(keras model, keras history, corebus model, corebus history) of one run each."""
    reference = make()
    kwargs = {"epochs": 3, "batch_size": 16, "shuffle": False, "verbose": 0, **fit_kwargs}
    ref_history = reference.fit(**kwargs, callbacks=callbacks() if callbacks else None)
    ours = make()
    history = corebus.Trainer(ours).fit(**kwargs, callbacks=callbacks() if callbacks else None)
    return reference, ref_history, ours, history


def assert_same_weights(a: keras.Model, b: keras.Model, atol: float = 1e-6) -> None:
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=atol)


def assert_same_history(a, b, rtol: float = 1e-5) -> None:
    assert a.epoch == b.epoch
    assert sorted(a.history) == sorted(b.history)
    for key in a.history:
        np.testing.assert_allclose(
            np.asarray(a.history[key], dtype=np.float64),
            np.asarray(b.history[key], dtype=np.float64),
            rtol=rtol,
            err_msg=key,
        )


# ---------------------------------------------------------------- arguments


def test_class_weight_matches_model_fit():
    ref, ref_h, ours, h = both({"x": X, "y": Y, "class_weight": {0: 1.0, 1: 4.0, 2: 0.5}})
    assert_same_weights(ref, ours)
    assert_same_history(ref_h, h)


def test_class_weight_on_a_dataset_matches_model_fit():
    ds = tf.data.Dataset.from_tensor_slices((X, Y)).batch(16)
    ref, _, ours, _ = both({"x": ds, "class_weight": {0: 2.0, 1: 1.0, 2: 3.0}, "shuffle": True})
    assert_same_weights(ref, ours)


def test_class_weight_and_sample_weight_together_is_one_clear_error():
    with pytest.raises(ConfigError, match="class_weight or sample_weight"):
        corebus.Trainer(model()).fit(X, Y, class_weight={0: 1}, sample_weight=np.ones(96), verbose=0)


def test_generator_with_steps_per_epoch_matches_model_fit():
    def endless():
        while True:
            for i in range(0, 96, 16):
                yield X[i : i + 16], Y[i : i + 16]

    ref = model()
    ref.fit(endless(), epochs=2, steps_per_epoch=4, verbose=0)
    ours = model()
    corebus.Trainer(ours).fit(endless(), epochs=2, steps_per_epoch=4, verbose=0)
    assert int(ours.optimizer.iterations) == int(ref.optimizer.iterations) == 8
    assert_same_weights(ref, ours)


class Batches(keras.utils.PyDataset):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.epochs_ended = 0

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return X[i * 16 : (i + 1) * 16], Y[i * 16 : (i + 1) * 16]

    def on_epoch_end(self):
        self.epochs_ended += 1


@pytest.mark.parametrize("workers", [1, 2])
def test_py_dataset_matches_model_fit_and_gets_its_epoch_ends(workers):
    ref_data, our_data = Batches(workers=workers), Batches(workers=workers)
    ref = model()
    ref.fit(ref_data, epochs=3, verbose=0, validation_data=Batches(), shuffle=False)
    ours = model()
    corebus.Trainer(ours).fit(our_data, epochs=3, verbose=0, validation_data=Batches(), shuffle=False)
    assert our_data.epochs_ended == ref_data.epochs_ended >= 3
    assert int(ours.optimizer.iterations) == int(ref.optimizer.iterations) == 18
    if workers == 1:
        # With worker threads the first batches' order depends on the threads' timing, in
        # model.fit too (its enqueuer keeps what the build's look at a batch left queued).
        assert_same_weights(ref, ours)


def test_validation_freq_list_matches_model_fit():
    ref, ref_h, ours, h = both({"x": X, "y": Y, "epochs": 4, "validation_split": 0.25, "validation_freq": [1, 3]})
    assert_same_history(ref_h, h)
    assert len(h.history["val_loss"]) == 2


def test_validation_steps_restart_every_evaluation_as_in_keras():
    val = tf.data.Dataset.from_tensor_slices((X, Y)).batch(16).repeat()
    ref, ref_h, ours, h = both({"x": X, "y": Y, "validation_data": val, "validation_steps": 2})
    assert_same_history(ref_h, h)


def test_steps_per_epoch_with_arrays_continues_through_the_data_as_keras_does():
    # 96 rows in batches of 16 are 6 batches: epochs of 4 steps go 4, 2, 4, 2 as in Keras
    ref, ref_h, ours, h = both({"x": X, "y": Y, "epochs": 4, "steps_per_epoch": 4})
    assert int(ours.optimizer.iterations) == int(ref.optimizer.iterations)
    assert_same_weights(ref, ours)


def test_initial_epoch_matches_model_fit():
    ref, ref_h, ours, h = both({"x": X, "y": Y, "epochs": 4, "initial_epoch": 2})
    assert h.epoch == ref_h.epoch == [2, 3]
    assert_same_weights(ref, ours)


def test_bad_validation_freq_fails_before_training():
    m = model()
    before = [w.copy() for w in m.get_weights()]
    with pytest.raises(ConfigError, match="validation_freq"):
        corebus.Trainer(m).fit(X, Y, validation_split=0.2, validation_freq="2", verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, m.get_weights()))


def test_compile_arguments_given_to_the_trainer_match_model_compile():
    def two_outputs(seed=0):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(8, activation="relu")(inputs)
        a = keras.layers.Dense(3, activation="softmax", name="a")(hidden)
        b = keras.layers.Dense(1, name="b")(hidden)
        return keras.Model(inputs, {"a": a, "b": b})

    targets = {"a": Y, "b": X.sum(1, keepdims=True)}
    compile_kwargs = dict(
        loss={"a": "sparse_categorical_crossentropy", "b": "mse"},
        loss_weights={"a": 1.0, "b": 0.25},
        metrics={"a": ["accuracy"]},
        weighted_metrics={"b": ["mae"]},
    )
    ref = two_outputs()
    ref.compile(optimizer=keras.optimizers.SGD(0.05), **compile_kwargs)
    ref_h = ref.fit(X, targets, epochs=2, batch_size=16, shuffle=False, verbose=0, sample_weight=np.linspace(0, 1, 96))
    ours = two_outputs()
    h = corebus.Trainer(ours, optimizer=keras.optimizers.SGD(0.05), **compile_kwargs).fit(
        X, targets, epochs=2, batch_size=16, shuffle=False, verbose=0, sample_weight=np.linspace(0, 1, 96)
    )
    assert_same_history(ref_h, h)
    assert_same_weights(ref, ours)


def test_run_eagerly_and_steps_per_execution_are_taken_from_the_compiled_model():
    m = model(compile_kwargs={"run_eagerly": True, "steps_per_execution": 3})
    trainer = corebus.Trainer(m)
    assert trainer.run_eagerly and trainer.steps_per_execution == 3 and trainer.jit_compile is False
    trainer.fit(X, Y, epochs=1, verbose=0)
    assert int(m.optimizer.iterations) == 3


def test_vector_metrics_stay_vectors_in_history_as_in_keras():
    def make():
        return model(metrics=[keras.metrics.F1Score(average=None)])

    y = keras.utils.to_categorical(Y, 3)

    def make_categorical():
        m = make()
        m.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss="categorical_crossentropy",
            metrics=[keras.metrics.F1Score(average=None)],
        )
        return m

    ref, ref_h, ours, h = both({"x": X, "y": y}, make=make_categorical)
    assert np.shape(h.history["f1_score"][0]) == np.shape(ref_h.history["f1_score"][0]) == (3,)
    assert_same_history(ref_h, h)


class OwnStep(keras.Model):
    """keras.io's "customizing what happens in fit": a model class with its own steps."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3, activation="softmax")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.calls = 0

    def call(self, x):
        return self.dense(x)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.losses.sparse_categorical_crossentropy(y, self(x, training=True))
            loss = tf.reduce_mean(loss) * 2.0  # unlike the default step: shows whose step ran
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        x, y = data
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, self(x))) * 2.0
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def test_a_model_with_its_own_train_step_runs_it():
    def make():
        keras.utils.set_random_seed(0)
        m = OwnStep()
        m.compile(optimizer=keras.optimizers.SGD(0.1))
        return m

    ref, ref_h, ours, h = both({"x": X, "y": Y, "validation_data": (X, Y)}, make=make)
    assert_same_history(ref_h, h)
    assert_same_weights(ref, ours)


def test_a_model_with_its_own_train_step_refuses_gradient_plugins():
    m = OwnStep()
    m.compile(optimizer="sgd")
    with pytest.raises(ConfigError, match="overrides train_step"):
        corebus.Trainer(m, plugins=[{"name": "gradient_clipping", "global_norm": 1.0}]).fit(X, Y, verbose=0)


def test_fit_without_targets_for_a_loss_that_needs_them_is_one_clear_error():
    with pytest.raises(ConfigError, match="no targets"):
        corebus.Trainer(model()).fit(X, None, verbose=0)


def test_an_empty_dataset_is_one_clear_error():
    empty = tf.data.Dataset.from_tensor_slices((X, Y)).take(0).batch(16)
    with pytest.raises(ConfigError, match="empty"):
        corebus.Trainer(model()).fit(empty, verbose=0)


# ---------------------------------------------------------------- seeds


SEEDED_SCRIPT = """
import sys, keras, numpy as np, tensorflow as tf, corebus
from corebus.testing import tiny_data
tf.config.experimental.enable_op_determinism()
keras.utils.set_random_seed(int(sys.argv[1]))
x, y = tiny_data(n=96, features=4, classes=3)
m = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.3), keras.layers.Dense(3)])
m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
corebus.Trainer(m).fit(x, y, epochs=2, batch_size=16, verbose=0)  # shuffled, with dropout
np.save(sys.argv[2], np.concatenate([w.ravel() for w in m.get_weights()]))
"""


def test_keras_global_seed_makes_runs_repeat_exactly(tmp_path):
    # Separate processes, as two runs of one script are (op determinism is process-wide).
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(SEEDED_SCRIPT)
    weights = []
    for i, seed in enumerate((7, 7, 8)):
        out = tmp_path / f"w{i}.npy"
        subprocess.run([sys.executable, str(script), str(seed), str(out)], check=True, capture_output=True)
        weights.append(np.load(out))
    assert np.array_equal(weights[0], weights[1])
    assert not np.array_equal(weights[0], weights[2])


def test_an_explicit_seed_wins_over_the_global_state():
    keras.utils.set_random_seed(1)
    a = corebus.Trainer(model(), seed=5).seed
    keras.utils.set_random_seed(2)
    assert corebus.Trainer(model(), seed=5).seed == a == 5


# ---------------------------------------------------------------- Keras callbacks


def _recording(name):
    def record(self, *args, logs=None):
        logs = args[-1] if args and isinstance(args[-1], dict) else logs
        kinds = tuple(sorted((k, type(v).__name__) for k, v in (logs or {}).items()))
        self.calls.append((name, args[0] if args and not isinstance(args[0], dict) else None, kinds))

    return record


class Recorder(keras.callbacks.Callback):
    """Records each call with its logs (names and Python types), as Keras hands them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def set_params(self, params):
        super().set_params(params)
        self.calls.append(("set_params", tuple(sorted((k, params[k]) for k in ("epochs", "steps", "verbose")))))

    for _hook in (
        "on_train_begin",
        "on_train_end",
        "on_epoch_begin",
        "on_epoch_end",
        "on_train_batch_begin",
        "on_train_batch_end",
        "on_test_begin",
        "on_test_end",
        "on_test_batch_begin",
        "on_test_batch_end",
        "on_predict_begin",
        "on_predict_end",
        "on_predict_batch_begin",
    ):
        locals()[_hook] = _recording(_hook)


def test_a_keras_callback_gets_keras_calls_in_keras_order_with_keras_logs():
    def run(fit):
        rec = Recorder()
        fit(rec)
        return [c for c in rec.calls if c[0] != "set_params"], [c for c in rec.calls if c[0] == "set_params"]

    ref_calls, ref_params = run(
        lambda rec: model().fit(X, Y, epochs=2, batch_size=32, verbose=0, validation_split=0.25, callbacks=[rec])
    )
    our_calls, our_params = run(
        lambda rec: corebus.Trainer(model()).fit(
            X, Y, epochs=2, batch_size=32, verbose=0, validation_split=0.25, callbacks=[rec]
        )
    )
    assert our_calls == ref_calls
    assert our_params[-1] == ref_params[-1]


def standard_callbacks(tmp_path, tag):
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=0.05, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=0.02),
        keras.callbacks.ModelCheckpoint(
            str(tmp_path / tag / "best.weights.h5"), save_best_only=True, save_weights_only=True
        ),
        keras.callbacks.CSVLogger(str(tmp_path / tag / "log.csv")),
        keras.callbacks.TerminateOnNaN(),
    ]


def test_keras_callbacks_give_model_fit_results_inside_trainer_fit(tmp_path):
    (tmp_path / "keras").mkdir()
    (tmp_path / "ours").mkdir()
    kwargs = dict(x=X, y=Y, epochs=12, batch_size=16, shuffle=False, verbose=0, validation_split=0.25)
    ref = model()
    ref_h = ref.fit(**kwargs, callbacks=standard_callbacks(tmp_path, "keras"))
    ours = model()
    h = corebus.Trainer(ours).fit(**kwargs, callbacks=standard_callbacks(tmp_path, "ours"))
    assert_same_history(ref_h, h)  # stop epoch, the LR trajectory ("learning_rate")
    assert len(h.epoch) < 12
    assert_same_weights(ref, ours)  # the restored best weights
    rows = [list(csv.reader(open(tmp_path / tag / "log.csv"))) for tag in ("keras", "ours")]
    assert rows[0][0] == rows[1][0] and len(rows[0]) == len(rows[1])
    for a, b in zip(rows[0][1:], rows[1][1:]):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5)
    saved = [keras.saving.load_model if False else None]
    for tag in ("keras", "ours"):
        assert (tmp_path / tag / "best.weights.h5").exists()
    del saved


def test_learning_rate_scheduler_and_lambda_callback_inside_trainer_fit():
    def callbacks():
        seen = []
        return [
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch else lr),
            keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs["loss"])),
        ], seen

    ref_cbs, ref_seen = callbacks()
    ref = model()
    ref_h = ref.fit(X, Y, epochs=3, batch_size=16, shuffle=False, verbose=0, callbacks=ref_cbs)
    our_cbs, our_seen = callbacks()
    ours = model()
    h = corebus.Trainer(ours).fit(X, Y, epochs=3, batch_size=16, shuffle=False, verbose=0, callbacks=our_cbs)
    assert_same_history(ref_h, h)
    np.testing.assert_allclose(our_seen, ref_seen, rtol=1e-6)
    assert float(ours.optimizer.learning_rate) == pytest.approx(0.025)


def test_terminate_on_nan_stops_at_the_same_batch_as_in_model_fit():
    target = X.sum(1)
    target[40:48] = np.nan  # batch 5's loss is NaN

    def regression():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        m.compile(optimizer="sgd", loss="mse")
        return m

    ref, ours = regression(), regression()
    ref.fit(X, target, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
    corebus.Trainer(ours).fit(
        X, target, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()]
    )
    assert int(ours.optimizer.iterations) == int(ref.optimizer.iterations) == 6


def test_backup_and_restore_resumes_at_its_epoch_as_in_model_fit(tmp_path):
    class StopAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    histories = {}
    for tag, fit in (
        ("keras", lambda m, cbs: m.fit(X, Y, epochs=4, batch_size=16, shuffle=False, verbose=0, callbacks=cbs)),
        (
            "ours",
            lambda m, cbs: corebus.Trainer(m).fit(
                X, Y, epochs=4, batch_size=16, shuffle=False, verbose=0, callbacks=cbs
            ),
        ),
    ):
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / tag))
        with pytest.raises(RuntimeError):
            fit(model(), [backup, StopAt()])
        m = model()
        histories[tag] = (fit(m, [keras.callbacks.BackupAndRestore(str(tmp_path / tag))]), m)
    assert histories["ours"][0].epoch == histories["keras"][0].epoch == [2, 3]
    assert_same_weights(histories["keras"][1], histories["ours"][1])


def test_swap_ema_weights_inside_trainer_fit():
    def make():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        m.compile(optimizer=keras.optimizers.SGD(0.1, use_ema=True), loss="sparse_categorical_crossentropy")
        return m

    ref, ref_h, ours, h = both(
        {"x": X, "y": Y, "validation_split": 0.25},
        make=make,
        callbacks=lambda: [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)],
    )
    assert_same_history(ref_h, h)
    assert_same_weights(ref, ours)


def test_tensorboard_callback_inside_trainer_fit_writes_what_it_writes_in_model_fit(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = {}
    for tag in ("keras", "ours"):
        m = model()
        fit = m.fit if tag == "keras" else corebus.Trainer(m).fit
        fit(
            X,
            Y,
            epochs=3,
            batch_size=16,
            shuffle=False,
            verbose=0,
            validation_split=0.25,
            callbacks=[keras.callbacks.TensorBoard(str(tmp_path / tag), update_freq=2)],
        )
        for run in ("train", "validation"):
            events = EventAccumulator(str(tmp_path / tag / run), size_guidance={"tensors": 0})
            events.Reload()
            written[tag, run] = {
                name: [(e.step, round(float(tf.make_ndarray(e.tensor_proto)), 5)) for e in events.Tensors(name)]
                for name in events.Tags()["tensors"]
                if name != "keras"
            }
    for run in ("train", "validation"):
        assert written["ours", run] == written["keras", run]
    assert written["ours", "train"]["batch_loss"] and written["ours", "validation"]["epoch_loss"]


def test_keras_callbacks_run_beside_corebus_plugins_and_show_in_the_hook_plan(tmp_path):
    early = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10)
    trainer = corebus.Trainer(model(), plugins=[{"name": "csv_logger", "filename": str(tmp_path / "h.csv")}])
    plan = trainer.describe(verbose=0, callbacks=[early])
    assert "keras_callbacks" in plan and "csv_logger" in plan
    history = trainer.fit(X, Y, epochs=5, verbose=0, callbacks=[early])
    assert history.epoch == [0, 1]  # Keras's EarlyStopping stopped the engine
    assert len(list(csv.reader(open(tmp_path / "h.csv")))) == 3


def test_a_keras_lr_callback_and_a_corebus_lr_plugin_are_refused_together():
    with pytest.raises(ConfigError, match="both control"):
        corebus.Trainer(model(), plugins=["reduce_lr_on_plateau"]).fit(
            X, Y, verbose=0, callbacks=[keras.callbacks.ReduceLROnPlateau()]
        )


def test_a_callback_class_or_a_plugin_in_callbacks_is_one_clear_error():
    with pytest.raises(ConfigError, match="instance"):
        corebus.Trainer(model()).fit(X, Y, verbose=0, callbacks=[keras.callbacks.History])
    with pytest.raises(ConfigError, match="plugins="):
        corebus.Trainer(model()).fit(X, Y, verbose=0, callbacks=["early_stopping"])


def test_evaluate_and_predict_take_keras_callbacks():
    rec_ref, rec_ours = Recorder(), Recorder()
    ref, ours = model(), model()
    ref_logs = ref.evaluate(X, Y, verbose=0, callbacks=[rec_ref], return_dict=True)
    our_logs = corebus.Trainer(ours).evaluate(X, Y, verbose=0, callbacks=[rec_ours], return_dict=True)
    assert our_logs == pytest.approx(ref_logs)
    ref.predict(X, verbose=0, callbacks=[rec_ref], batch_size=32)
    corebus.Trainer(ours).predict(X, verbose=0, callbacks=[rec_ours], batch_size=32)
    strip = [c[:2] for c in rec_ref.calls if c[0] != "set_params"]
    assert [c[:2] for c in rec_ours.calls if c[0] != "set_params"] == strip


def test_wandb_metrics_logger_runs_inside_trainer_fit(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb.integration.keras import WandbMetricsLogger

    from wandb_reader import read_run, run_files

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="parity", dir=str(tmp_path))
    try:
        corebus.Trainer(model()).fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[WandbMetricsLogger()])
    finally:
        run.finish()
    rows = read_run(run_files(tmp_path, run.id)[0]).history
    epochs = [r for r in rows if "epoch/loss" in r]
    assert len(epochs) == 2


def test_mlflow_keras_callback_runs_inside_trainer_fit(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.keras import MlflowCallback

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("parity")
    with mlflow.start_run() as run:
        history = corebus.Trainer(model()).fit(
            X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[MlflowCallback(run)]
        )
    client = mlflow.MlflowClient()
    points = client.get_metric_history(run.info.run_id, "loss")
    assert [p.value for p in sorted(points, key=lambda p: p.step)] == pytest.approx(history.history["loss"])


def test_a_custom_train_step_with_compile_arguments_uses_them_and_matches_model_fit():
    """keras.io's pattern written as a corebus step: the loss and metrics given to the Trainer
    reach the step through model.compute_loss / compute_metrics, reset every epoch."""

    def step(trainer, data):
        x, y = data
        model = trainer.model
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        model._loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])
        grads = tape.gradient(loss, model.trainable_variables)
        trainer.apply_gradients(grads, model.trainable_variables)
        return model.compute_metrics(x, y, y_pred)

    def bare(seed=0):
        keras.utils.set_random_seed(seed)
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3, activation="softmax")]
        )

    ref = bare()
    ref.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ref_h = ref.fit(X, Y, epochs=3, batch_size=16, shuffle=False, verbose=0)
    ours = bare()
    h = corebus.Trainer(
        ours,
        optimizer=keras.optimizers.SGD(0.1),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        train_step=step,
    ).fit(X, Y, epochs=3, batch_size=16, shuffle=False, verbose=0)
    assert_same_history(ref_h, h)  # per-epoch means: the metrics were reset at every epoch
    assert_same_weights(ref, ours)
