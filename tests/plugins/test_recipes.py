"""The recipe examples in examples/ run with tiny settings and do what they say.

Each example's ``main(argv)`` trains into ``tmp_path``; what it wrote is read back the way a
user would (weights into a fresh model, TensorBoard event files, ``.npz`` / JSON / CSV files,
the MLflow sqlite store with ``MlflowClient``), and its numbers are checked against Keras.
"""

import csv
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from corebus.demo import digits_mlp, load_digits_split

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
S = keras.optimizers.schedules


def load_example(name):
    """Import examples/<name>.py (examples/ is not a package) as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"corebus_recipe_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def val_loss_of(model, x, y):
    """Cross-entropy of a softmax model on (x, y), computed here, not by the run."""
    probabilities = np.asarray(model(x, training=False), dtype="float64")
    return float(-np.mean(np.log(probabilities[np.arange(len(y)), y])))


# ---------------------------------------------------------------------- model.fit recipes


def tensorboard_scalars(directory):
    """``{tag: [(step, value), ...]}`` of the scalar summaries in ``directory``."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {
        tag: [(e.step, tf.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


def test_keras_fit_callbacks(tmp_path):
    example = load_example("keras_fit_callbacks")
    epochs, lr = 3, 1e-3
    # min_delta=10: only the first epoch "improves", so the stop and the reductions are certain
    results = example.main(
        [
            "--epochs",
            str(epochs),
            "--patience",
            "1",
            "--min-delta",
            "10",
            "--learning-rate",
            str(lr),
            "--out",
            str(tmp_path),
            "--verbose",
            "0",
        ]
    )
    assert list(results) == ["checkpoint", "early_stopping", "plateau", "tensorboard", "combined"]
    (_, _), (x_val, y_val) = load_digits_split()

    # checkpoint: the two best epochs by val_loss, named as asked, plus last; loadable
    _, history, _ = results["checkpoint"]
    val = history.history["val_loss"]
    best_two = sorted(range(epochs), key=val.__getitem__)[:2]
    files = sorted(p.name for p in (tmp_path / "checkpoint" / "checkpoints").glob("*.weights.h5"))
    assert files == sorted([f"epoch{e + 1:02d}-{val[e]:.4f}.weights.h5" for e in best_two] + ["last.weights.h5"])
    restored = digits_mlp()
    restored.load_weights(tmp_path / "checkpoint" / "checkpoints" / "last.weights.h5")
    assert val_loss_of(restored, x_val, y_val) == pytest.approx(val[-1], rel=1e-4)

    # early stopping: stopped after the epoch that did not improve, best weights restored
    model, history, callback = results["early_stopping"]
    stopper = callback.bus.plugins["EarlyStopping"]
    assert history.epoch == [0, 1] and stopper.stopped_epoch == 1 and stopper.best_epoch == 0
    assert val_loss_of(model, x_val, y_val) == pytest.approx(history.history["val_loss"][0], rel=1e-4)

    # plateau: halved at every epoch end after the first (patience 1, nothing improves)
    model, history, _ = results["plateau"]
    np.testing.assert_allclose(
        history.history["learning_rate"], [lr * 0.5 ** max(0, e - 1) for e in range(epochs)], rtol=1e-6
    )
    assert float(model.optimizer.learning_rate) == pytest.approx(lr * 0.5 ** (epochs - 1), rel=1e-6)

    # tensorboard: Keras's tags, the History's values
    _, history, _ = results["tensorboard"]
    train = tensorboard_scalars(tmp_path / "tensorboard" / "tensorboard" / "train")
    validation = tensorboard_scalars(tmp_path / "tensorboard" / "tensorboard" / "validation")
    np.testing.assert_allclose([v for _, v in train["epoch_loss"]], np.float32(history.history["loss"]), rtol=1e-6)
    np.testing.assert_allclose(
        [v for _, v in validation["epoch_loss"]], np.float32(history.history["val_loss"]), rtol=1e-6
    )

    # combined: every plugin acted in the same model.fit, clipping through the wrapped optimizer
    model, history, callback = results["combined"]
    assert history.epoch == [0, 1]
    assert set(callback.bus.plugins) >= {
        "ReduceLROnPlateau",
        "EarlyStopping",
        "ModelCheckpoint",
        "TensorBoardLogger",
        "GradientClipping",
    }
    assert (tmp_path / "combined" / "checkpoints" / "last.weights.h5").exists()
    assert tensorboard_scalars(tmp_path / "combined" / "tensorboard" / "train")["epoch_loss"]
    assert float(model.optimizer.learning_rate) == pytest.approx(lr * 0.5, rel=1e-6)


# ---------------------------------------------------------------------- a custom logging plugin


@pytest.mark.parametrize("way", ["trainer", "keras"])
def test_save_predictions(tmp_path, way):
    example = load_example("save_predictions")
    saver, history = example.main(
        ["--epochs", "5", "--every", "2", "--out", str(tmp_path), "--verbose", "0"]
        + (["--keras"] if way == "keras" else [])
    )
    (_, _), (x_val, y_val) = load_digits_split()
    files = sorted((tmp_path / "predictions").iterdir())
    assert [f.name for f in files] == ["epoch002.npz", "epoch004.npz"] == saver.saved
    steps_per_epoch = math.ceil(len(load_digits_split()[0][0]) / 64)
    for path, epoch in zip(files, (2, 4)):
        with np.load(path, allow_pickle=False) as saved:
            assert saved["predictions"].shape == (len(x_val), 10)
            np.testing.assert_allclose(saved["predictions"].sum(axis=1), 1.0, rtol=1e-5)  # softmax rows
            np.testing.assert_array_equal(saved["labels"], y_val)
            assert int(saved["epoch"]) == epoch and int(saved["step"]) == epoch * steps_per_epoch
            # the predictions of that epoch: their accuracy is the epoch's val_accuracy
            accuracy = float(np.mean(saved["predictions"].argmax(axis=1) == y_val))
            assert accuracy == pytest.approx(history.history["val_accuracy"][epoch - 1], abs=1e-6)
    assert saver.state_dict() == {"saved": ["epoch002.npz", "epoch004.npz"]}


# ---------------------------------------------------------------------- LR schedules


def test_lr_schedules(tmp_path):
    example = load_example("lr_schedules")
    epochs, steps, lr = 4, 5, 0.1
    results = example.main(
        [
            "--epochs",
            str(epochs),
            "--steps-per-epoch",
            str(steps),
            "--learning-rate",
            str(lr),
            "--out",
            str(tmp_path),
            "--verbose",
            "0",
        ]
    )
    saved = json.loads((tmp_path / "lr_schedules.json").read_text())
    assert saved == json.loads(json.dumps(results)) and saved["steps_per_epoch"] == steps
    total = epochs * steps
    keras_schedules = {
        "exponential": S.ExponentialDecay(lr, decay_steps=steps, decay_rate=0.8),
        "step": S.ExponentialDecay(lr, decay_steps=2 * steps, decay_rate=0.5, staircase=True),
        "cosine": S.CosineDecay(lr, decay_steps=total, alpha=0.05),
        "warmup": S.CosineDecay(0.0, decay_steps=total - steps, alpha=0.05, warmup_target=lr, warmup_steps=steps),
    }
    assert set(saved["schedules"]) == set(keras_schedules)
    for name, schedule in keras_schedules.items():
        # the LR an epoch ended with: the schedule at the updates done by then
        expected = [float(schedule(steps * (e + 1))) for e in range(epochs)]
        np.testing.assert_allclose(saved["schedules"][name]["learning_rate"], expected, rtol=1e-6, err_msg=name)
        assert len(saved["schedules"][name]["val_loss"]) == epochs
    # the warm-up really starts from 0: after one epoch it is at its peak, not beyond
    assert saved["schedules"]["warmup"]["learning_rate"][0] == pytest.approx(lr, rel=1e-6)


# ---------------------------------------------------------------------- custom loop


def test_custom_loop(tmp_path):
    example = load_example("custom_loop")
    epochs = 3
    trainer = example.main(
        ["--epochs", str(epochs), "--hidden", "32", "--patience", "5", "--out", str(tmp_path), "--verbose", "0"]
    )
    history = trainer.history.history
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history["val_loss"]) == epochs
    assert history["val_loss"][-1] < history["val_loss"][0]
    # test_step's val_loss is the plain cross-entropy over the whole validation set (the
    # weighted running mean copes with the short last batch): recompute it from the restored
    # best weights
    (_, _), (x_val, y_val) = load_digits_split()
    logits = np.asarray(trainer.model(x_val, training=False), "float64")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert float(-log_p[np.arange(len(y_val)), y_val].mean()) == pytest.approx(min(history["val_loss"]), rel=1e-4)
    assert float(np.mean(logits.argmax(axis=1) == y_val)) == pytest.approx(
        history["val_accuracy"][int(np.argmin(history["val_loss"]))], abs=1e-6
    )
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["val_loss"]) for r in rows], history["val_loss"], rtol=1e-6)


# ---------------------------------------------------------------------- gradients


def test_gradients(tmp_path):
    example = load_example("gradients")
    lr, clip, k, batch = 0.05, 0.5, 4, 16
    results = example.main(
        [
            "--epochs",
            "1",
            "--samples",
            "256",
            "--learning-rate",
            str(lr),
            "--clip",
            str(clip),
            "--accumulate",
            str(k),
            "--batch-size",
            str(batch),
            "--out",
            str(tmp_path),
            "--verbose",
            "0",
        ]
    )
    # clipping: the gradients were above the threshold, and no SGD update moved further than lr * clip
    clipped = results["clipping"]
    norms = clipped.bus.plugins["UpdateNorms"].norms
    assert len(norms) == 256 // batch
    assert clipped.bus.plugins["GradientClipping"].last_norm > clip
    assert max(norms) <= lr * clip * (1 + 1e-4)
    assert max(norms) == pytest.approx(lr * clip, rel=1e-3)  # and the clip was the binding limit

    # accumulation: N micro-batches, N / k updates, the weights of batches k times larger
    small, big = results["accumulation"]
    micro_batches = 256 // batch
    assert small.micro_step == micro_batches
    assert int(small.optimizer.iterations.numpy()) == small.global_step == micro_batches // k
    assert int(big.optimizer.iterations.numpy()) == micro_batches // k
    for a, b in zip(small.model.get_weights(), big.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(small.model.get_weights(), digits_mlp().get_weights()))
    summary = json.loads((tmp_path / "gradients.json").read_text())
    assert summary["accumulation"]["updates"] == micro_batches // k


# ---------------------------------------------------------------------- optimizers


def test_adam_hyperparameters(tmp_path):
    example = load_example("adam_hyperparameters")
    rows = example.main(
        [
            "--learning-rates",
            "1e-3",
            "1e-2",
            "--beta-1",
            "0.9",
            "--epsilon",
            "1e-7",
            "1e-3",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "5",
            "--out",
            str(tmp_path),
            "--verbose",
            "0",
        ]
    )
    grid = {(r["learning_rate"], r["beta_1"], r["epsilon"]) for r in rows}
    assert grid == {(lr, 0.9, eps) for lr in (1e-3, 1e-2) for eps in (1e-7, 1e-3)}
    for row in rows:  # each run really used its hyper-parameters
        config = row["optimizer_config"]
        assert (config["learning_rate"], config["beta_1"], config["epsilon"]) == pytest.approx(
            (row["learning_rate"], row["beta_1"], row["epsilon"])
        )
        assert math.isfinite(row["best_val_loss"]) and 1 <= row["best_epoch"] <= row["epochs_run"] == 2
    assert [r["best_val_loss"] for r in rows] == sorted(r["best_val_loss"] for r in rows)
    assert len({round(r["best_val_loss"], 6) for r in rows}) == len(rows)  # the knobs changed the outcome
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["best_val_loss"]) for r in table] == pytest.approx([r["best_val_loss"] for r in rows])
    assert list(table[0]) == example.COLUMNS


@pytest.mark.slow
def test_compare_optimizers(tmp_path):
    from mlflow.tracking import MlflowClient

    example = load_example("compare_optimizers")
    epochs = 2
    histories = example.main(
        ["--epochs", str(epochs), "--steps-per-epoch", "5", "--out", str(tmp_path), "--verbose", "0"]
    )
    names = {"sgd", "sgd_momentum", "rmsprop", "adam", "adamw"}
    assert set(histories) == names

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(example.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(names)  # one run per optimizer
    for run in runs:
        name = run.info.run_name
        assert run.info.status == "FINISHED"
        points = sorted(client.get_metric_history(run.info.run_id, "epoch/val_loss"), key=lambda m: m.step)
        np.testing.assert_allclose([m.value for m in points], np.float32(histories[name]["val_loss"]), rtol=1e-6)
        assert len(points) == epochs
        assert (
            run.data.tags["optimizer"]
            == {"sgd": "SGD", "sgd_momentum": "SGD", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW"}[name]
        )
    # the optimizers really differ: momentum changes SGD's trajectory
    assert histories["sgd"]["val_loss"] != histories["sgd_momentum"]["val_loss"]

    png = (tmp_path / "val_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 300 and height > 200


# ---------------------------------------------------------------------- the plugin-author kit


PACKAGE = EXAMPLES / "plugin_package"


@pytest.mark.slow
def test_plugin_package_installs_lists_and_passes_its_tests(tmp_path):
    import tomllib

    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    ((name, target),) = project["entry-points"]["corebus.plugins"].items()
    # built from a copy, so the source tree gets no build/ or *.egg-info
    root = shutil.copytree(
        PACKAGE,
        tmp_path / "plugin_package",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "-q", str(root)], check=True)
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "corebus", "plugins", "--json"], capture_output=True, text=True, check=True
        )
        info = next(p for p in json.loads(listing.stdout) if p["name"] == name)
        assert (info["distribution"], info["version"]) == (project["name"], project["version"])
        assert "on_epoch_end" in info["hooks"]
        table = subprocess.run(
            [sys.executable, "-m", "corebus", "plugins"], capture_output=True, text=True, check=True
        ).stdout
        assert any(line.split()[:2] == [name, project["name"]] for line in table.splitlines())

        # the package's own tests, run the way its author runs them (corebus.testing fixtures)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        # (run from the folder above the copy, so the *installed* module is the one imported)
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
        )
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
        summary = tests.stdout.strip().splitlines()[-1]
        assert re.match(r"\d+ passed", summary) and " failed" not in summary, summary
    finally:
        subprocess.run(pip + ["uninstall", "-y", "-q", project["name"]], check=True)
    assert target.split(":")[0] not in sys.modules  # this process never imported it


# ---------------------------------------------------------------------- the recipes as a set

RECIPES = [
    "keras_fit_callbacks",
    "save_predictions",
    "lr_schedules",
    "custom_loop",
    "gradients",
    "adam_hyperparameters",
    "compare_optimizers",
]
PUBLIC_MODULES = {
    "corebus",
    "corebus.kit",
    "corebus.plugins",
    "corebus.integrations",
    "corebus.testing",
    "corebus.demo",
}


@pytest.mark.parametrize(
    "path", [EXAMPLES / f"{name}.py" for name in RECIPES] + [PACKAGE / "corebus_best_metric.py"], ids=lambda p: p.name
)
def test_recipes_use_only_the_public_api(path):
    import ast

    import corebus

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("corebus"):
            assert node.module in PUBLIC_MODULES, f"{path.name} imports {node.module}"
            if node.module == "corebus":
                assert {a.name for a in node.names} <= set(corebus.__all__), path.name
            if node.module == "corebus.kit":
                assert {a.name for a in node.names} <= set(corebus.kit.__all__), path.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("corebus") or alias.name in PUBLIC_MODULES, alias.name
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "corebus":
            assert node.attr in corebus.__all__ or node.attr == "__version__", f"{path.name}: corebus.{node.attr}"


def test_docs_list_every_recipe_with_a_command_that_parses():
    section = (ROOT / "docs" / "examples.md").read_text()  # the README links it
    rows = re.findall(r"^\| `examples/(\w+)\.py` \|.*\| `python examples/\w+\.py([^`]*)` \|$", section, re.M)
    assert [name for name, _ in rows] == RECIPES
    for name, flags in rows:  # the documented flags exist
        parser_flags = set(re.findall(r'add_argument\("(--[\w-]+)"', (EXAMPLES / f"{name}.py").read_text()))
        assert set(re.findall(r"--[\w-]+", flags)) <= parser_flags, name
    assert "writing-a-plugin.md" in section and "examples/plugin_package/" in section
