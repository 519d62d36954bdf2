"""What loggers get per step (``on_log`` batch values): each step's own loss and metrics, and the
gradient norm from the gradient pipeline, checked against independent arithmetic."""

import keras
import numpy as np
import pytest

import corebus
from corebus import ConfigError, hookimpl
from corebus.engine.trainer import STEP_VALUE
from corebus.testing import RecordingPlugin, make_trainer, tiny_model

LR = 0.1


class StepSpy:
    """Records on_log batch values, the running batch logs and the weights around every step."""

    gradient_taps = {"norm"}

    def __init__(self):
        self.values, self.running, self.weights = [], [], []

    @hookimpl
    def on_train_begin(self, trainer):
        self.weights.append(_flat(trainer.model))

    @hookimpl
    def on_train_batch_end(self, trainer, logs):
        self.running.append(dict(logs))
        self.weights.append(_flat(trainer.model))

    @hookimpl
    def on_log(self, kind, logs):
        if kind == "batch":
            self.values.append(dict(logs))


def _flat(model):
    return np.concatenate([np.asarray(w).reshape(-1) for w in model.trainable_weights]).astype(np.float64)


def test_engine_logs_each_steps_own_loss_and_accuracy(tiny_data):
    x, y = tiny_data  # 96 samples, batch 16: 6 equal batches per epoch
    spy = StepSpy()
    make_trainer([spy], optimizer=keras.optimizers.SGD(LR)).fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert len(spy.values) == 12 and all({"loss", "accuracy", "grad_norm"} <= set(v) for v in spy.values)
    for epoch in range(2):
        values, running = spy.values[epoch * 6 : (epoch + 1) * 6], spy.running[epoch * 6 : (epoch + 1) * 6]
        for name in ("loss", "accuracy"):
            own = np.array([v[name] for v in values])
            # Keras's running mean is the mean of the steps' own values (equal batch sizes)
            np.testing.assert_allclose(np.cumsum(own) / np.arange(1, 7), [r[name] for r in running], rtol=1e-5)
            assert own[0] == pytest.approx(running[0][name], rel=1e-6)
        assert len({round(v["loss"], 6) for v in values}) > 1


def test_accuracy_of_a_step_is_that_batchs_accuracy(tiny_data):
    x, y = tiny_data
    spy, seen = StepSpy(), []

    class Predictions:
        @hookimpl
        def on_train_batch_begin(self, trainer, batch):
            seen.append(np.argmax(trainer.model.predict_on_batch(x[batch * 16 : (batch + 1) * 16]), axis=1))

    make_trainer([Predictions(), spy], optimizer=keras.optimizers.SGD(LR)).fit(
        x, y, batch_size=16, epochs=1, verbose=0, shuffle=False
    )
    expected = [np.mean(p == y[i * 16 : (i + 1) * 16]) for i, p in enumerate(seen)]
    np.testing.assert_allclose([v["accuracy"] for v in spy.values], expected, rtol=1e-6)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_grad_norm_is_the_norm_of_the_update_before_clipping(tiny_data, clip):
    x, y = tiny_data
    spy = StepSpy()
    plugins = [spy] + ([{"name": "gradient_clipping", "global_norm": clip}] if clip else [])
    make_trainer(plugins, optimizer=keras.optimizers.SGD(LR)).fit(
        x, y, batch_size=16, epochs=1, verbose=0, shuffle=False
    )
    applied = [np.linalg.norm(b - a) / LR for a, b in zip(spy.weights, spy.weights[1:])]  # SGD: dw = -lr * g
    norms = [v["grad_norm"] for v in spy.values]
    if clip is None:
        np.testing.assert_allclose(norms, applied, rtol=1e-4)
    else:
        np.testing.assert_allclose(applied, clip, rtol=1e-3)  # what the optimizer applied was clipped
        assert min(norms) > 2 * clip  # the logged norm is the raw gradient's


def test_grad_norm_in_model_fit_through_the_adapter(tiny_data):
    x, y = tiny_data
    spy = StepSpy()
    callback = corebus.KerasCallback([spy])
    model = tiny_model()
    model.compile(
        optimizer=callback.wrap_optimizer(keras.optimizers.SGD(LR)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[callback])
    applied = [np.linalg.norm(b - a) / LR for a, b in zip(spy.weights, spy.weights[1:])]
    np.testing.assert_allclose([v["grad_norm"] for v in spy.values], applied, rtol=1e-4)
    # model.fit hands callbacks running means only: on_log gets those
    assert [v["loss"] for v in spy.values] == [r["loss"] for r in spy.running]


def test_no_gradient_norm_unless_asked_and_one_fetch_for_both_views(tiny_data):
    x, y = tiny_data

    class Plain:
        def __init__(self):
            self.values = []

        @hookimpl
        def on_log(self, kind, logs):
            if kind == "batch":
                self.values.append(logs)

        @hookimpl
        def on_train_batch_end(self, logs):
            self.last = logs

    plain = Plain()
    make_trainer([plain]).fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert "grad_norm" not in plain.values[0]
    plain.values[-2].to_dict()  # read in step order, as loggers do
    before = corebus.LazyLogs.fetches
    assert plain.last["loss"] > 0 and plain.values[-1]["loss"] > 0
    assert corebus.LazyLogs.fetches == before + 1  # the loss of both views: one host fetch
    assert plain.values[-1]["accuracy"] >= 0  # derived from this call's and the call before's
    assert corebus.LazyLogs.fetches == before + 1  # (already read) running means


def test_custom_step_values_and_named_optimizer_norms(tiny_data):
    x, y = tiny_data
    spy = StepSpy()
    model = tiny_model()
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def step(trainer, data):
        import tensorflow as tf

        xb, yb = data
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, trainer.model(xb, training=True))
        grads = tape.gradient(loss, trainer.model.trainable_variables)
        trainer.apply_gradients(grads, trainer.model.trainable_variables, optimizer="main")
        return {"loss": loss}

    trainer = corebus.Trainer(
        model, optimizer={"main": keras.optimizers.SGD(LR)}, train_step=step, plugins=[spy], seed=0
    )
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    applied = [np.linalg.norm(b - a) / LR for a, b in zip(spy.weights, spy.weights[1:])]
    np.testing.assert_allclose([v["grad_norm/main"] for v in spy.values], applied, rtol=1e-4)
    assert [v["loss"] for v in spy.values] == [r["loss"] for r in spy.running]  # a custom step's own values


def test_unknown_gradient_tap_is_rejected_before_training(tiny_data):
    class Wrong:
        gradient_taps = {"hessian"}

        @hookimpl
        def on_log(self):
            pass

    with pytest.raises(ConfigError, match="gradient_taps has 'hessian'; use any of"):
        make_trainer([Wrong()]).fit(*tiny_data, batch_size=16, epochs=1, verbose=0)


class LearningRateSpy:
    """on_log's batch learning rate beside an eager read of the optimizer's after each step."""

    def __init__(self):
        self.logged, self.eager = [], []

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.eager.append(trainer.lr.value)

    @hookimpl
    def on_log(self, kind, logs):
        if kind == "batch":
            self.logged.append(logs["learning_rate"])


@pytest.mark.parametrize("mode", ["engine", "keras"])
def test_step_values_carry_the_learning_rate_after_each_update(tiny_data, mode):
    # a per-step schedule: the value must be the one after this step's update, not a later one
    x, y = tiny_data
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.9)
    spy = LearningRateSpy()
    fit = dict(batch_size=16, epochs=2, verbose=0, shuffle=False)
    if mode == "engine":
        make_trainer([spy], optimizer=keras.optimizers.SGD(schedule), steps_per_execution=2).fit(x, y, **fit)
    else:
        model = tiny_model()
        model.compile(
            optimizer=keras.optimizers.SGD(schedule), loss="sparse_categorical_crossentropy", steps_per_execution=2
        )
        model.fit(x, y, callbacks=[corebus.KerasCallback([spy])], **fit)
    # 12 steps in calls of 2: the LR after steps 2, 4, ... 12
    np.testing.assert_allclose(spy.logged, [0.1 * 0.9**step for step in range(2, 13, 2)], rtol=1e-6)
    np.testing.assert_allclose(spy.logged, spy.eager, rtol=1e-6)


def test_a_call_cut_short_by_the_end_of_a_dataset_still_carries_the_learning_rate(tiny_data):
    import tensorflow as tf

    x, y = tiny_data  # 96 samples, batch 16: 6 batches, in calls of 4 -> the second call ends early
    unknown = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(16)
    spy = LearningRateSpy()
    make_trainer([spy], optimizer=keras.optimizers.SGD(LR), steps_per_execution=4).fit(unknown, epochs=1, verbose=0)
    assert spy.logged == pytest.approx([LR, LR]) and spy.eager == pytest.approx([LR, LR])


def test_epoch_only_subscribers_cost_the_step_no_step_values(tiny_data):
    x, y = tiny_data

    class EpochOnly:
        batch_log_cadence = None  # epoch records only

        def __init__(self):
            self.epochs = []

        @hookimpl
        def on_log(self, kind, logs):
            self.epochs.append((kind, dict(logs)))

    epoch_only = EpochOnly()
    trainer = make_trainer([epoch_only])
    trainer.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert not trainer._step_values  # nothing extra computed in the step
    assert not any(name.startswith(STEP_VALUE) for name in trainer._train_log_names)
    assert [kind for kind, _ in epoch_only.epochs] == ["epoch", "epoch"]
    assert {"loss", "accuracy", "learning_rate"} <= set(epoch_only.epochs[0][1])

    every_step = RecordingPlugin()  # declares no cadence: it takes every batch record
    trainer = make_trainer([EpochOnly(), every_step])
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert trainer._step_values and STEP_VALUE + "loss" in trainer._train_log_names
