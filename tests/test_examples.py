"""The examples in examples/ run, with tiny sizes, and do what they say.

Each example's ``main(argv)`` trains into ``tmp_path``; the run directory is then read back
the way a user would: checkpoint files loaded into a fresh model, TensorBoard event files with
TensorBoard's EventAccumulator, the MLflow sqlite store with ``MlflowClient``.
"""

import importlib.util
import math
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
S = keras.optimizers.schedules


def load_example(name):
    """Import examples/<name>.py (examples/ is not a package) as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"corebus_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # keras.saving and dataclasses look classes up by module
    spec.loader.exec_module(module)
    return module


def tensorboard_scalars(directory):
    """``{tag: [(step, value), ...]}`` of the scalar summaries in ``directory``."""
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    scalars = {}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars":
            scalars[tag] = [(e.step, tf.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
    return scalars


def mlflow_run(run_dir, run_name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("corebus-examples")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    return run, history


def assert_logged_everywhere(run_dir, run_name, history, keys):
    """The epoch metrics reached TensorBoard and MLflow with the values of the History."""
    train = tensorboard_scalars(run_dir / "tensorboard" / "train")
    run, mlflow_history = mlflow_run(run_dir, run_name)
    assert run.info.status == "FINISHED"
    epochs = len(history["loss" if "loss" in history else keys[0]])
    for key in keys:
        expected = np.float32(history[key])
        assert [step for step, _ in train[f"epoch_{key}"]] == list(range(epochs))
        np.testing.assert_allclose([v for _, v in train[f"epoch_{key}"]], expected, rtol=1e-6)
        np.testing.assert_allclose(mlflow_history(f"epoch/{key}"), expected, rtol=1e-6)
        assert key in run.data.metrics  # batch values too (every 10 steps)
    if "val_loss" in history:
        validation = tensorboard_scalars(run_dir / "tensorboard" / "validation")
        np.testing.assert_allclose([v for _, v in validation["epoch_loss"]], np.float32(history["val_loss"]), rtol=1e-6)
    assert run.data.params["plugins.gradient_clipping.log_norm"] == "True"  # the run's config went along


def checkpoint_files(run_dir):
    files = sorted(p.name for p in (run_dir / "checkpoints").glob("*.weights.h5"))
    assert "last.weights.h5" in files
    assert len(files) == 3  # save_top_k=2, plus last
    return files


def test_gan(tmp_path):
    gan = load_example("gan")
    run_dir = tmp_path / "gan"
    epochs, steps, clip = 3, 7, 0.05
    trainer = gan.main(
        [
            "--epochs",
            str(epochs),
            "--steps-per-epoch",
            str(steps),
            "--batch-size",
            "32",
            "--hidden",
            "16",
            "--clip",
            str(clip),
            "--out",
            str(run_dir),
            "--verbose",
            "0",
        ]
    )
    history = trainer.history.history
    assert len(history["d_loss"]) == epochs
    for key in ("d_loss", "g_loss", "mode_distance", "modes_covered"):
        assert all(math.isfinite(v) for v in history[key]), (key, history[key])

    # the generator moved from its initial weights (rebuilt from the same seed)
    keras.utils.set_random_seed(0)
    initial = gan.GAN(hidden=16, seed=0).generator.get_weights()
    moved = max(float(np.abs(a - b).max()) for a, b in zip(trainer.model.generator.get_weights(), initial))
    assert moved > 1e-3

    plugins = trainer.bus.plugins
    # clipping on the discriminator only, and active (its pre-clip norm is above the threshold)
    assert set(plugins["gradient_clipping"].last_norms) == {"discriminator"}
    assert plugins["gradient_clipping"].last_norms["discriminator"] > clip
    # the cosine schedule drives the generator only: its LR at each epoch end is Keras's CosineDecay
    cosine = S.CosineDecay(2e-3, decay_steps=epochs * steps, alpha=0.1)
    np.testing.assert_allclose(
        history["learning_rate/generator"], [float(cosine(steps * (e + 1))) for e in range(epochs)], rtol=1e-6
    )
    assert trainer.lr_for("discriminator").value == pytest.approx(1e-3)
    assert not trainer.lr_for("discriminator").has_schedule
    # early stopping watches the distance to the modes, lower is better
    stopper = plugins["early_stopping"]
    assert stopper.monitor == "mode_distance" and stopper.best == pytest.approx(min(history["mode_distance"]))

    files = checkpoint_files(run_dir)
    best_two = sorted(range(epochs), key=lambda e: history["mode_distance"][e])[:2]
    assert sorted(f"epoch{e + 1:02d}-{history['mode_distance'][e]:.3f}.weights.h5" for e in best_two) == [
        f for f in files if f != "last.weights.h5"
    ]
    restored = gan.GAN(hidden=16)
    restored(np.zeros((1, restored.noise_dim), "float32"))
    restored.load_weights(run_dir / "checkpoints" / "last.weights.h5")
    assert any(not np.array_equal(a, b) for a, b in zip(restored.generator.get_weights(), initial))

    assert_logged_everywhere(run_dir, "gan", history, ["d_loss", "g_loss", "mode_distance"])
    train = tensorboard_scalars(run_dir / "tensorboard" / "train")
    assert "epoch_learning_rate/generator" in train


def test_multitask(tmp_path):
    multitask = load_example("multitask")
    run_dir = tmp_path / "multitask"
    # 3 epochs of 7 steps stay within one pass over the data (23 batches of 64): with more, an epoch
    # would end early where the pass ends, as model.fit's do
    epochs, steps, clip = 3, 7, 0.05
    trainer = multitask.main(
        [
            "--epochs",
            str(epochs),
            "--steps-per-epoch",
            str(steps),
            "--ink-weight",
            "0.5",
            "--clip",
            str(clip),
            "--out",
            str(run_dir),
            "--verbose",
            "0",
        ]
    )
    history = trainer.history.history
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert history["digit_accuracy"][-1] > 0.3  # 10 classes: chance is 0.1
    # the reported loss is the weighted sum of the per-head losses (running means over an epoch)
    for prefix in ("", "val_"):
        np.testing.assert_allclose(
            history[f"{prefix}loss"],
            np.add(history[f"{prefix}digit_loss"], 0.5 * np.array(history[f"{prefix}ink_loss"])),
            rtol=1e-5,
        )
    # warm-up over the first epoch, then Keras's CosineDecay from its own step 0
    cosine = S.CosineDecay(3e-3, decay_steps=epochs * steps, alpha=0.05)
    np.testing.assert_allclose(history["learning_rate"], [float(cosine(steps * e)) for e in range(epochs)], rtol=1e-6)
    assert trainer.bus.plugins["gradient_clipping"].last_norm > clip  # the clip scaled the last update

    checkpoint_files(run_dir)
    model = multitask.TwoHeads()
    model(np.zeros((1, 64), "float32"))
    model.load_weights(run_dir / "checkpoints" / "last.weights.h5")
    assert set(model(np.zeros((2, 64), "float32"))) == {"digit", "ink"}
    assert_logged_everywhere(run_dir, "multitask", history, ["loss", "digit_loss", "ink_loss", "digit_accuracy"])


def test_contrastive(tmp_path):
    contrastive = load_example("contrastive")
    pairs, same = contrastive.make_pairs(np.eye(64, dtype="float32")[np.arange(40) % 64], np.arange(40) % 4)
    assert set(pairs) == {"anchor", "other"} and 0 < same.mean() < 1
    anchor_class = np.argmax(pairs["anchor"], axis=1) % 4
    other_class = np.argmax(pairs["other"], axis=1) % 4
    np.testing.assert_array_equal(anchor_class == other_class, same.astype(bool))  # labels say "same digit"

    run_dir = tmp_path / "contrastive"
    epochs, steps = 3, 7  # within one pass over the pairs (see test_multitask)
    trainer = contrastive.main(
        [
            "--epochs",
            str(epochs),
            "--steps-per-epoch",
            str(steps),
            "--clip",
            "0.05",
            "--out",
            str(run_dir),
            "--verbose",
            "0",
        ]
    )
    history = trainer.history.history
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert history["val_pair_accuracy"][-1] > 0.6  # chance is 0.5
    # the embedding separates the pairs: same-digit pairs end closer than different ones
    assert history["val_same_distance"][-1] < history["val_different_distance"][-1]
    np.testing.assert_allclose(history["learning_rate"], [2e-3 * 0.85 ** (e + 1) for e in range(epochs)], rtol=1e-6)
    assert trainer.bus.plugins["gradient_clipping"].last_norm > 0.05

    checkpoint_files(run_dir)
    assert_logged_everywhere(run_dir, "contrastive", history, ["loss", "pair_accuracy"])


def test_readme_custom_step_snippet_runs(capsys):
    import re

    section = (EXAMPLES.parent / "docs" / "custom-steps.md").read_text()  # moved from the README
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "epochs=20" in code and "size=(4096, 2)" in code
    namespace: dict = {}
    exec(
        compile(
            code.replace("epochs=20", "epochs=2").replace("size=(4096, 2)", "size=(512, 2)"),
            "README custom step",
            "exec",
        ),
        namespace,
    )
    history, trainer = namespace["history"].history, namespace["trainer"]
    assert history["learning_rate/generator"][-1] < 2e-3  # the cosine schedule, on the generator only
    assert not trainer.lr_for("discriminator").has_schedule
    assert int(trainer.optimizers["generator"].iterations.numpy()) == 8
    assert all(math.isfinite(v) for v in history["d_loss"] + history["g_loss"])
    assert capsys.readouterr().out.strip()
