"""LRSchedule and ReduceLROnPlateau addressing one optimizer or several, by name (custom steps)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import corebus
from corebus import ConfigError, hookimpl
from corebus.plugins.lr_schedule import LRSchedule
from corebus.plugins.reduce_lr_on_plateau import ReduceLROnPlateau
from corebus.testing import tiny_gan

S = keras.optimizers.schedules
DECAY = dict(initial_learning_rate=0.1, decay_steps=3, decay_rate=0.7)
D_LR = 0.05
EPOCHS, BATCH, STEPS_PER_EPOCH = 4, 16, 4


def gan_data():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(64, 4)).astype("float32")
    real = rng.normal(loc=2.0, size=(64, 2)).astype("float32")
    return noise, real


def gan_trainer(plugins, generator_lr=0.1, discriminator_lr=D_LR):
    """A tiny GAN with the two-optimizer custom step; the noise comes from the data (no RNG)."""
    gan = tiny_gan()
    generator, discriminator = gan.generator, gan.discriminator
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def gan_step(trainer, data):
        z, real, _ = keras.utils.unpack_x_y_sample_weight(data)
        ones, zeros = tf.ones_like(real[:, :1]), tf.zeros_like(real[:, :1])
        with tf.GradientTape() as tape:
            d_loss = bce(ones, discriminator(real)) + bce(zeros, discriminator(generator(z)))
        trainer.apply_gradients(
            tape.gradient(d_loss, discriminator.trainable_variables),
            discriminator.trainable_variables,
            optimizer="discriminator",
        )
        with tf.GradientTape() as tape:
            g_loss = bce(ones, discriminator(generator(z)))
        trainer.apply_gradients(
            tape.gradient(g_loss, generator.trainable_variables), generator.trainable_variables, optimizer="generator"
        )
        return {"d_loss": d_loss, "g_loss": g_loss}

    optimizers = {
        "discriminator": keras.optimizers.SGD(discriminator_lr),
        "generator": keras.optimizers.SGD(generator_lr),
    }
    return corebus.Trainer(gan, optimizer=optimizers, train_step=gan_step, plugins=plugins, seed=0)


def fit(trainer, epochs=EPOCHS):
    noise, real = gan_data()
    return trainer.fit(noise, real, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)


class OptimizerLRs:
    """Before every step: the global step and each optimizer's ``learning_rate`` (what that step uses)."""

    def __init__(self):
        self.rows = []

    @hookimpl
    def on_train_batch_begin(self, trainer):
        lrs = {name: float(keras.ops.convert_to_numpy(opt.learning_rate)) for name, opt in trainer.optimizers.items()}
        iterations = {name: int(opt.iterations.numpy()) for name, opt in trainer.optimizers.items()}
        self.rows.append((trainer.global_step, iterations, lrs))


class Replay(keras.optimizers.schedules.LearningRateSchedule):
    """Plain Keras: the recorded per-step rates, built into the optimizer."""

    def __init__(self, values):
        self.values = tf.constant(list(values) + [values[-1]], tf.float32)  # + the LR read after the last step

    def __call__(self, step):
        return tf.gather(self.values, step)


def test_schedule_on_the_generator_only_and_a_plateau_on_both():
    # Every epoch after the first is a plateau (min_delta is huge): x0.5 at the ends of epochs 1 and 2.
    schedule = LRSchedule("exponential", optimizers="generator", **DECAY)
    plateau = ReduceLROnPlateau(monitor="g_loss", factor=0.5, patience=0, min_delta=100.0)
    recorder = OptimizerLRs()
    trainer = gan_trainer([schedule, plateau, recorder])
    history = fit(trainer)

    reference = S.ExponentialDecay(**DECAY)
    multiplier = [1.0, 1.0, 0.5, 0.25]  # per epoch: reduced at the end of epochs 1 and 2
    steps = [row[0] for row in recorder.rows]
    assert steps == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert all(row[1] == {"discriminator": row[0], "generator": row[0]} for row in recorder.rows)
    generator = [row[2]["generator"] for row in recorder.rows]
    discriminator = [row[2]["discriminator"] for row in recorder.rows]
    np.testing.assert_allclose(generator, [float(reference(s)) * multiplier[s // 4] for s in steps], rtol=1e-6)
    np.testing.assert_allclose(discriminator, [D_LR * multiplier[s // 4] for s in steps], rtol=1e-7)
    assert len(set(generator)) == len(steps)  # the schedule moves every step; the discriminator only at plateaus
    assert trainer.lr_for("generator").schedule_owner == "LRSchedule"
    assert not trainer.lr_for("discriminator").has_schedule
    assert plateau.multipliers == {"discriminator": 0.125, "generator": 0.125}  # the last epoch end reduced too

    # epoch logs: one learning rate per named optimizer, the value the epoch ended with
    assert "learning_rate" not in history.history
    np.testing.assert_allclose(
        history.history["learning_rate/generator"],
        [float(reference(4 * (e + 1))) * multiplier[e] for e in range(EPOCHS)],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        history.history["learning_rate/discriminator"], [D_LR * m for m in multiplier], rtol=1e-7
    )

    # the compiled step really used those rates: the same run in plain Keras terms, each
    # optimizer built with the recorded rates as its schedule and no LR plugin, ends with the
    # same weights
    replay = gan_trainer([], generator_lr=Replay(generator), discriminator_lr=Replay(discriminator))
    fit(replay)
    for ours, theirs in zip(trainer.model.get_weights(), replay.model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    # and the schedule mattered: without it the generator ends elsewhere
    constant = gan_trainer([ReduceLROnPlateau(monitor="g_loss", factor=0.5, patience=0, min_delta=100.0)])
    fit(constant)
    generator_weights = trainer.model.generator.get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(generator_weights, constant.model.generator.get_weights())) > 1e-4


def test_plateau_on_one_optimizer_and_a_schedule_on_all():
    plateau = ReduceLROnPlateau(monitor="d_loss", factor=0.5, patience=0, min_delta=100.0, optimizers=["discriminator"])
    schedule = LRSchedule("exponential", **DECAY)  # optimizers=None: every optimizer of the run
    recorder = OptimizerLRs()
    history = fit(gan_trainer([schedule, plateau, recorder]), epochs=3)
    reference = S.ExponentialDecay(**DECAY)
    multiplier = [1.0, 1.0, 0.5]
    for step, _, lrs in recorder.rows:
        assert lrs["generator"] == pytest.approx(float(reference(step)), rel=1e-6)
        assert lrs["discriminator"] == pytest.approx(float(reference(step)) * multiplier[step // 4], rel=1e-6)
    assert {"learning_rate/generator", "learning_rate/discriminator"} <= set(history.history)
    assert plateau.state_dict()["multipliers"] == {"discriminator": 0.25}


def test_unknown_optimizer_name_fails_before_any_step():
    for plugin in (
        LRSchedule("exponential", optimizers=["generater"], **DECAY),
        ReduceLROnPlateau(monitor="g_loss", optimizers="generater"),
    ):
        trainer = gan_trainer([plugin])
        before = [w.copy() for w in trainer.model.get_weights()]
        with pytest.raises(
            ConfigError,
            match=r"optimizers=\['generater'\]: no optimizer named \['generater'\]; "
            r"this run has \['discriminator', 'generator'\]",
        ):
            fit(trainer)
        assert all(int(opt.iterations.numpy()) == 0 for opt in trainer.optimizers.values())
        assert all(np.array_equal(a, b) for a, b in zip(before, trainer.model.get_weights()))
    for bad in ([], [3]):
        with pytest.raises(ConfigError, match="non-empty list of names"):
            LRSchedule("exponential", optimizers=bad, **DECAY)
        with pytest.raises(ConfigError, match="non-empty list of names"):
            ReduceLROnPlateau(optimizers=bad)


def test_ownership_is_per_optimizer():
    both = [
        LRSchedule("exponential", optimizers="generator", **DECAY),
        LRSchedule("cosine", decay_steps=20, optimizers="discriminator"),
        ReduceLROnPlateau(monitor="g_loss", optimizers="generator"),
        ReduceLROnPlateau(monitor="d_loss", optimizers="discriminator"),
    ]
    trainer = gan_trainer(both)
    fit(trainer, epochs=1)
    assert trainer.lr_for("generator").schedule_owner == "LRSchedule"
    assert trainer.lr_for("discriminator").schedule_owner == "LRSchedule#2"
    # two schedules on the same optimizer: rejected at registration, naming both
    with pytest.raises(ConfigError, match=r"'LRSchedule' and 'LRSchedule#2' both control 'lr.schedule\[generator\]'"):
        gan_trainer(
            [
                LRSchedule("exponential", optimizers="generator", **DECAY),
                LRSchedule("cosine", decay_steps=20, optimizers=["discriminator", "generator"]),
            ]
        )
    with pytest.raises(ConfigError, match=r"both control 'lr.multiplier\[generator\]'"):
        gan_trainer([ReduceLROnPlateau(optimizers="generator"), ReduceLROnPlateau(optimizers="generator")])
    # one on every optimizer and one on "generator": caught when the second installs, before any step
    trainer = gan_trainer(
        [LRSchedule("exponential", **DECAY), LRSchedule("cosine", decay_steps=20, optimizers="generator")]
    )
    with pytest.raises(ConfigError, match=r"'LRSchedule' already owns the learning rate and the 'LRSchedule#2' plugin"):
        fit(trainer)
    assert int(trainer.optimizers["generator"].iterations.numpy()) == 0
    # an optimizer built with its own schedule is the other owner, per optimizer
    trainer = gan_trainer(
        [LRSchedule("cosine", decay_steps=20, optimizers="discriminator")], generator_lr=S.ExponentialDecay(**DECAY)
    )
    fit(trainer, epochs=1)  # the generator's own schedule is left alone
    with pytest.raises(ConfigError, match=r"'optimizer' already owns the learning rate"):
        fit(
            gan_trainer(
                [LRSchedule("cosine", decay_steps=20, optimizers="generator")], generator_lr=S.ExponentialDecay(**DECAY)
            )
        )


def test_state_dicts_per_optimizer_and_from_older_snapshots():
    class AccumulateGenerator:  # per-optimizer accumulation: the updates per epoch differ
        @hookimpl
        def gradient_accumulation_steps(self, optimizer_name):
            return 2 if optimizer_name == "generator" else None

    schedule = LRSchedule("step", initial_learning_rate=0.1, drop=0.5, epochs_drop=1)
    fit(gan_trainer([schedule, AccumulateGenerator()]), epochs=1)
    state = json.loads(json.dumps(schedule.state_dict()))
    assert state == {"steps_per_epoch": {"discriminator": 4, "generator": 2}}
    restored = LRSchedule("step", initial_learning_rate=0.1, drop=0.5, epochs_drop=1)
    restored.load_state_dict(state)
    assert restored.state_dict() == state

    # a snapshot from before per-optimizer schedules: one number, for every driven optimizer
    old = LRSchedule("step", initial_learning_rate=0.1, drop=0.5, epochs_drop=1)
    old.load_state_dict({"steps_per_epoch": 2})
    recorder = OptimizerLRs()
    fit(gan_trainer([old, recorder]), epochs=1)
    assert old.state_dict() == {"steps_per_epoch": 2}
    # epochs of 2 updates (the restored value, not this run's 4): the LR halves after step 1
    assert [row[2]["generator"] for row in recorder.rows] == pytest.approx([0.05, 0.05, 0.025, 0.025])

    plateau = ReduceLROnPlateau(monitor="g_loss")
    plateau.load_state_dict({"wait": 1, "cooldown_counter": 0, "best": 0.5, "multiplier": 0.5})  # older snapshot
    assert plateau.state_dict() == {"wait": 1, "cooldown_counter": 0, "best": 0.5, "multiplier": 0.5, "multipliers": {}}
