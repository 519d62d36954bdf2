"""LRSchedule and corebus.plugins.schedules against Keras's schedules and LearningRateScheduler."""

import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError, hookimpl
from corebus.plugins.lr_schedule import LRSchedule
from corebus.plugins.schedules import CyclicalLR, LinearWarmup, StepDecay
from corebus.testing import fit_both_ways, make_trainer, tiny_data, tiny_model

S = keras.optimizers.schedules
LOSS = "sparse_categorical_crossentropy"
STEPS = np.arange(0, 100)


class LRPerStep:
    """The effective LR before every step (the one that step uses): (step, lr)."""

    def __init__(self):
        self.rows = []

    @hookimpl
    def on_train_batch_begin(self, trainer):
        self.rows.append((trainer.global_step, trainer.lr.value))


class KerasLRPerStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.rows.append((int(optimizer.iterations.numpy()), float(optimizer.learning_rate)))


@keras.saving.register_keras_serializable(package="corebus_tests")
class WarmUpSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A user schedule (the Transformer tutorial's): rsqrt(d_model) * min(rsqrt(t), t * w^-1.5)."""

    def __init__(self, d_model=16, warmup_steps=8):
        self.d_model = d_model
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        t = tf.cast(step, tf.float32) + 1.0
        return tf.math.rsqrt(float(self.d_model)) * tf.minimum(tf.math.rsqrt(t), t * self.warmup_steps**-1.5)

    def get_config(self):
        return {"d_model": self.d_model, "warmup_steps": self.warmup_steps}


class FromFunction(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, function):
        self.function = function

    def __call__(self, step):
        return self.function(step)


def installed_values(plugin, steps=STEPS, optimizer=None):
    """The effective LR the optimizer computes at each step, once ``plugin`` installed itself."""
    context = corebus.RunContext()  # what plugins get as ``trainer``, without a model to train
    context.optimizers = {"default": optimizer or keras.optimizers.SGD()}
    context.params = {"steps": 4}
    plugin.on_train_begin(trainer=context)
    values = []
    for step in steps:
        context.optimizer.iterations.assign(int(step))
        values.append(context.lr.value)
    return np.array(values)


KERAS_EQUIVALENTS = {
    "exponential": (
        ("exponential", dict(initial_learning_rate=0.1, decay_steps=7, decay_rate=0.8)),
        S.ExponentialDecay(0.1, 7, 0.8),
    ),
    "exponential_staircase": (
        ("exponential", dict(initial_learning_rate=0.1, decay_steps=7, decay_rate=0.8, staircase=True)),
        S.ExponentialDecay(0.1, 7, 0.8, staircase=True),
    ),
    "cosine_alpha": (
        ("cosine", dict(initial_learning_rate=0.1, decay_steps=60, alpha=0.1)),
        S.CosineDecay(0.1, 60, alpha=0.1),
    ),
    "cosine_warmup": (
        ("cosine", dict(initial_learning_rate=0.0, decay_steps=60, alpha=0.05, warmup_target=0.2, warmup_steps=15)),
        S.CosineDecay(0.0, 60, alpha=0.05, warmup_target=0.2, warmup_steps=15),
    ),
    "cosine_restarts": (
        ("cosine", dict(initial_learning_rate=0.1, first_decay_steps=10, t_mul=2.0, m_mul=0.7, alpha=0.01)),
        S.CosineDecayRestarts(0.1, 10, t_mul=2.0, m_mul=0.7, alpha=0.01),
    ),
    "cosine_restarts_t_mul_1": (
        ("cosine", dict(initial_learning_rate=0.1, first_decay_steps=12, t_mul=1.0)),
        S.CosineDecayRestarts(0.1, 12, t_mul=1.0),
    ),
    "step_by_count": (
        ("step", dict(initial_learning_rate=0.1, drop=0.5, decay_steps=6)),
        S.ExponentialDecay(0.1, 6, 0.5, staircase=True),
    ),
    "polynomial": (
        ("polynomial", dict(initial_learning_rate=0.1, decay_steps=50, end_learning_rate=0.01, power=2.0)),
        S.PolynomialDecay(0.1, 50, end_learning_rate=0.01, power=2.0),
    ),
    "inverse_time": (
        ("inverse_time", dict(initial_learning_rate=0.1, decay_steps=5, decay_rate=0.5)),
        S.InverseTimeDecay(0.1, 5, 0.5),
    ),
    "piecewise_constant": (
        ("piecewise_constant", dict(boundaries=[10, 30], values=[0.1, 0.05, 0.01])),
        S.PiecewiseConstantDecay([10, 30], [0.1, 0.05, 0.01]),
    ),
}


@pytest.mark.parametrize("case", sorted(KERAS_EQUIVALENTS))
def test_named_schedule_equals_the_keras_schedule_at_every_step(case):
    (name, params), reference = KERAS_EQUIVALENTS[case]
    ours = installed_values(LRSchedule(name, **params))
    expected = [float(reference(int(step))) for step in STEPS]
    np.testing.assert_allclose(ours, expected, rtol=1e-7, atol=0)
    assert len(set(np.round(expected, 9))) > 2  # the schedule moves over the checked steps


def smith(step, base_lr, max_lr, step_size, mode, gamma=1.0):
    """Smith (2015), section 3.1, in float64."""
    cycle = np.floor(1 + step / (2 * step_size))
    x = np.abs(step / step_size - 2 * cycle + 1)
    scale = {"triangular": 1.0, "triangular2": 1 / 2.0 ** (cycle - 1), "exp_range": gamma**step}[mode]
    return base_lr + (max_lr - base_lr) * np.maximum(0, 1 - x) * scale


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclical_follows_smith_2015(mode):
    params = dict(base_lr=0.001, max_lr=0.01, step_size=8, mode=mode, gamma=0.99)
    expected = smith(STEPS.astype(float), **params)
    np.testing.assert_allclose(installed_values(LRSchedule("cyclical", **params)), expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose([float(CyclicalLR(**params)(int(s))) for s in STEPS], expected, rtol=1e-5, atol=1e-9)


def test_step_decay_epoch_formula_and_warmup_wrapping():
    # the classic initial_lr * drop ** floor((1 + epoch) / epochs_drop), epoch = step // steps_per_epoch
    epochs = STEPS // 4
    classic = 0.1 * 0.5 ** np.floor((1 + epochs) / 3)
    ours = installed_values(LRSchedule("step", initial_learning_rate=0.1, drop=0.5, epochs_drop=3, steps_per_epoch=4))
    np.testing.assert_allclose(ours, classic, rtol=1e-7)
    # warm-up from 0 to the schedule's first value over 10 steps, then the schedule from its step 0
    decay = S.ExponentialDecay(0.1, 7, 0.8)
    expected = [0.1 * s / 10 if s < 10 else float(decay(int(s) - 10)) for s in STEPS]
    ours = installed_values(
        LRSchedule("exponential", initial_learning_rate=0.1, decay_steps=7, decay_rate=0.8, warmup_steps=10)
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    # a warm-up target of its own, into a user schedule
    user = WarmUpSchedule()
    expected = [0.05 * s / 6 if s < 6 else float(user(int(s) - 6)) for s in STEPS]
    np.testing.assert_allclose(
        installed_values(LRSchedule(user, warmup_steps=6, warmup_target=0.05)), expected, rtol=1e-6
    )


def test_initial_learning_rate_defaults_to_the_optimizers():
    ours = installed_values(LRSchedule("cosine", decay_steps=50), optimizer=keras.optimizers.SGD(0.3))
    np.testing.assert_allclose(ours, [float(S.CosineDecay(0.3, 50)(int(s))) for s in STEPS], rtol=1e-6)


def test_per_step_function_is_traced_with_the_step():
    ours = installed_values(LRSchedule(lambda step: 0.1 / (1.0 + 0.05 * step)))
    np.testing.assert_allclose(ours, 0.1 / (1.0 + 0.05 * STEPS), rtol=1e-6)


TRAINING = {
    "exponential_staircase": (
        lambda: LRSchedule("exponential", initial_learning_rate=0.1, decay_steps=3, decay_rate=0.7, staircase=True),
        lambda: S.ExponentialDecay(0.1, 3, 0.7, staircase=True),
    ),
    "cosine_warmup": (
        lambda: LRSchedule(
            "cosine", initial_learning_rate=0.01, decay_steps=12, alpha=0.1, warmup_target=0.2, warmup_steps=8
        ),
        lambda: S.CosineDecay(0.01, 12, alpha=0.1, warmup_target=0.2, warmup_steps=8),
    ),
    "user_warmup_schedule": (
        lambda: LRSchedule(WarmUpSchedule(d_model=4, warmup_steps=6)),
        lambda: WarmUpSchedule(d_model=4, warmup_steps=6),
    ),
    "step_function": (
        lambda: LRSchedule(lambda step: 0.2 / (1.0 + 0.1 * step)),
        lambda: FromFunction(lambda step: 0.2 / (1.0 + 0.1 * tf.cast(step, tf.float32))),
    ),
    "cyclical_triangular2": (
        lambda: LRSchedule("cyclical", base_lr=0.01, max_lr=0.3, step_size=3, mode="triangular2"),
        lambda: CyclicalLR(0.01, 0.3, 3, mode="triangular2"),
    ),
}


@pytest.mark.parametrize("case", sorted(TRAINING))
def test_training_uses_the_schedule_at_every_step(case, tiny_data):
    make_plugin, make_schedule = TRAINING[case]
    x, y = tiny_data
    fit = dict(batch_size=24, epochs=5)  # 4 steps per epoch, 20 steps
    (engine, engine_history), (adapter, adapter_history) = fit_both_ways(
        lambda: [make_plugin(), LRPerStep()], x, y, **fit
    )
    schedule = make_schedule()
    expected = [(step, float(schedule(step))) for step in range(20)]
    np.testing.assert_allclose(engine[1].rows, expected, rtol=1e-7)
    np.testing.assert_allclose(adapter[1].rows, expected, rtol=1e-7)
    # plain Keras with the schedule built into the optimizer: same rates, same weights
    model, recorder = tiny_model(), KerasLRPerStep()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=make_schedule()), loss=LOSS, metrics=["accuracy"])
    model.fit(x, y, shuffle=False, verbose=0, callbacks=[recorder], **fit)
    np.testing.assert_allclose(recorder.rows, expected, rtol=1e-7)
    for history in (engine_history, adapter_history):
        for ours, theirs in zip(history.model.get_weights(), model.get_weights()):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # learning_rate in the epoch logs: the rate of the next step, as Keras reports it
    np.testing.assert_allclose(
        engine_history.history["learning_rate"], [float(schedule(4 * (e + 1))) for e in range(5)], rtol=1e-7
    )


def classic_per_epoch(epoch, lr):
    return lr if epoch < 2 else lr * 0.5


@pytest.mark.parametrize(
    "function", [classic_per_epoch, lambda epoch: 0.2 * 0.7**epoch], ids=["epoch_lr", "epoch_only"]
)
def test_per_epoch_function_matches_learning_rate_scheduler(function, tiny_data):
    x, y = tiny_data
    fit = dict(batch_size=24, epochs=5)
    (_, engine), (_, adapter) = fit_both_ways(lambda: [LRSchedule(function, per="epoch")], x, y, **fit)
    model = tiny_model()
    model.compile(optimizer="sgd", loss=LOSS, metrics=["accuracy"])
    scheduler = keras.callbacks.LearningRateScheduler(function)
    reference = model.fit(x, y, shuffle=False, verbose=0, callbacks=[scheduler], **fit)
    expected = reference.history["learning_rate"]
    assert len(set(expected)) >= 3
    np.testing.assert_allclose(engine.history["learning_rate"], expected, rtol=1e-7)
    np.testing.assert_allclose(adapter.history["learning_rate"], expected, rtol=1e-7)
    for ours, theirs in zip(engine.model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_named_schedule_per_epoch_and_steps_counting_updates(tiny_data):
    x, y = tiny_data
    history = make_trainer([LRSchedule("step", initial_learning_rate=0.1, drop=0.5, epochs_drop=2, per="epoch")]).fit(
        x, y, batch_size=24, epochs=5, verbose=0
    )
    # set at each epoch start, logged at its end: the classic formula at the epoch index
    np.testing.assert_allclose(
        history.history["learning_rate"], [0.1 * 0.5 ** np.floor((1 + e) / 2) for e in range(5)], rtol=1e-7
    )

    class AccumulateTwo:
        @hookimpl
        def gradient_accumulation_steps(self):
            return 2

    plugin, recorder = LRSchedule("step", initial_learning_rate=0.1, drop=0.5, epochs_drop=1), LRPerStep()
    trainer = make_trainer([plugin, AccumulateTwo(), recorder])
    trainer.fit(x, y, batch_size=24, epochs=3, verbose=0)
    # 4 batches per epoch, 2 updates: the schedule counts optimizer updates
    assert plugin.state_dict() == {"steps_per_epoch": 2}
    updates = [s for s, _ in recorder.rows]
    assert updates == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    expected = [0.1 * 0.5 ** np.floor((1 + s // 2) / 1) for s in updates]
    np.testing.assert_allclose([lr for _, lr in recorder.rows], expected, rtol=1e-7)


def test_two_schedules_are_an_error_naming_both(tiny_data):
    x, y = tiny_data
    first = lambda: LRSchedule("exponential", initial_learning_rate=0.1, decay_steps=5, decay_rate=0.9)  # noqa: E731
    with pytest.raises(ConfigError, match=r"'LRSchedule' and 'LRSchedule#2' both control 'lr.schedule'"):
        make_trainer([first(), first()])
    with pytest.raises(ConfigError, match=r"'lr_schedule' and 'lr_schedule#2' both control"):
        corebus.KerasCallback(
            [
                {"name": "lr_schedule", "schedule": "cosine", "decay_steps": 9},
                {"name": "lr_schedule", "schedule": "step", "decay_steps": 3},
            ]
        )
    # an optimizer built with its own schedule is the other owner
    built_in = keras.optimizers.SGD(S.ExponentialDecay(0.1, 5, 0.9))
    trainer = make_trainer([first()], optimizer=built_in)
    before = [w.copy() for w in trainer.model.get_weights()]
    with pytest.raises(ConfigError, match=r"'optimizer' already owns the learning rate and the 'LRSchedule' plugin"):
        trainer.fit(x, y, batch_size=24, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, trainer.model.get_weights()))  # no step ran
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(S.CosineDecay(0.1, 9)), loss=LOSS)
    with pytest.raises(ConfigError, match=r"'optimizer'.*'lr_schedule' plugin.*float learning_rate"):
        callback = corebus.KerasCallback([{"name": "lr_schedule", "schedule": "step", "decay_steps": 3}])
        model.fit(x, y, verbose=0, callbacks=[callback])
    with pytest.raises(ConfigError, match="'optimizer' already owns"):
        make_trainer(
            [LRSchedule(classic_per_epoch, per="epoch")], optimizer=keras.optimizers.SGD(S.CosineDecay(0.1, 9))
        ).fit(x, y, epochs=1, verbose=0)


def test_bad_input_fails_at_construction():
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'; known names: exponential, step, cosine, cyclical"):
        LRSchedule("cosin", decay_steps=10)
    accepted = r"rejected its params.*Accepted: ExponentialDecay\(initial_learning_rate, decay_steps, decay_rate"
    with pytest.raises(ConfigError, match=accepted):
        LRSchedule("exponential", initial_learning_rate=0.1, decay_steps=10)
    with pytest.raises(ConfigError, match="decay_steps"):
        LRSchedule("exponential", initial_learning_rate=0.1, decay_steps=0, decay_rate=0.5)
    with pytest.raises(ConfigError, match="mode='sawtooth' is unknown"):
        LRSchedule("cyclical", mode="sawtooth")
    with pytest.raises(ConfigError, match="per='hour'"):
        LRSchedule("cosine", decay_steps=10, per="hour")
    with pytest.raises(ConfigError, match="for schedule names only"):
        LRSchedule(S.CosineDecay(0.1, 10), decay_steps=5)
    with pytest.raises(ConfigError, match="rejected its params"):
        corebus.Trainer(
            tiny_model(), "sgd", LOSS, plugins=[{"name": "lr_schedule", "schedule": "exponential", "decay_rate": 0.1}]
        )
    with pytest.raises(ValueError):  # Keras rejects the same
        S.ExponentialDecay(0.1, 0, 0.5)


def test_schedules_trace_in_graph_and_are_keras_serializable():
    schedules = (
        StepDecay(0.1, drop=0.5, epochs_drop=2, steps_per_epoch=3),
        StepDecay(0.1, decay_steps=4),
        CyclicalLR(0.01, 0.1, 4, "exp_range", 0.95),
        LinearWarmup(5, after=S.CosineDecayRestarts(0.1, 10)),
        LinearWarmup(5, warmup_target=0.2),
        LinearWarmup(0, after=WarmUpSchedule()),
    )
    step = tf.Variable(0, dtype=tf.int64)  # what an optimizer passes: its iterations

    for schedule in schedules:
        traced = tf.function(lambda: schedule(step))  # noqa: B023 - called within this iteration
        eager = [float(schedule(s)) for s in range(40)]
        in_graph = []
        for s in range(40):
            step.assign(s)
            in_graph.append(float(traced()))
        np.testing.assert_allclose(in_graph, eager, rtol=1e-5)  # graph cos() may round differently
        config = keras.saving.serialize_keras_object(schedule)
        assert config["registered_name"].startswith("corebus>")
        clone = keras.saving.deserialize_keras_object(json.loads(json.dumps(config)))
        np.testing.assert_allclose([float(clone(s)) for s in range(40)], eager, rtol=1e-7)


def test_state_dict_round_trip_resumes_exactly(tiny_data):
    x, y = tiny_data
    make = lambda: LRSchedule("step", initial_learning_rate=0.2, drop=0.5, epochs_drop=2)  # noqa: E731
    fit = dict(batch_size=24, verbose=0, shuffle=False)
    whole_plugins = [make(), LRPerStep()]
    whole = make_trainer(whole_plugins)
    whole.fit(x, y, epochs=4, **fit)

    first_plugins = [make(), LRPerStep()]
    first = make_trainer(first_plugins)
    first.fit(x, y, epochs=2, **fit)
    state = json.loads(json.dumps(first_plugins[0].state_dict()))
    assert state == {"steps_per_epoch": 4}
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    # a fresh process: new model and optimizer holding the snapshot's weights and step count
    model = tiny_model()
    model.set_weights(first.model.get_weights())
    second_plugins = [resumed, LRPerStep()]
    second = make_trainer(second_plugins, model=model, optimizer=keras.optimizers.SGD())
    second.optimizer.iterations.assign(first.optimizer.iterations)
    second.fit(x, y, epochs=4, initial_epoch=2, **fit)
    lrs = [lr for _, lr in first_plugins[1].rows + second_plugins[1].rows]
    np.testing.assert_allclose(lrs, [lr for _, lr in whole_plugins[1].rows], rtol=1e-7)
    assert len(set(lrs)) == 3
    for ours, theirs in zip(second.model.get_weights(), whole.model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # the same instance again on the same trainer: the schedule continues, it is not reinstalled
    whole.fit(x, y, epochs=1, **fit)
    rows = whole_plugins[1].rows[16:]
    assert [step for step, _ in rows] == [16, 17, 18, 19]
    expected = [0.2 * 0.5 ** np.floor((1 + s // 4) / 2) for s, _ in rows]
    np.testing.assert_allclose([lr for _, lr in rows], expected, rtol=1e-7)


@pytest.mark.parametrize("interactive", [True, False])
def test_verbose_messages_go_where_keras_sends_them(interactive, capsys, caplog):
    x, y = tiny_data(n=48)

    def halve(epoch, lr):
        return 0.1 * 0.5**epoch

    fit = dict(batch_size=24, epochs=2, verbose=0, shuffle=False)
    (keras.config.enable_interactive_logging if interactive else keras.config.disable_interactive_logging)()
    try:
        with caplog.at_level(logging.INFO):
            model = tiny_model()
            model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
            model.fit(x, y, callbacks=[keras.callbacks.LearningRateScheduler(halve, verbose=1)], **fit)
            theirs = capsys.readouterr().out, [r.getMessage() for r in caplog.records if "setting" in r.getMessage()]
            caplog.clear()
            make_trainer([LRSchedule(halve, per="epoch", verbose=1)]).fit(x, y, **fit)
            ours = capsys.readouterr().out, [r.getMessage() for r in caplog.records if "setting" in r.getMessage()]
    finally:
        keras.config.enable_interactive_logging()
    # Same channel as Keras's LearningRateScheduler, same wording apart from the class name.
    assert [part.replace("LearningRateScheduler", "LRSchedule") for part in (theirs[0], *theirs[1])] == [
        ours[0],
        *ours[1],
    ]
    assert bool(theirs[0]) is interactive and bool(theirs[1]) is not interactive
