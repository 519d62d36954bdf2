"""TensorBoardLogger(hparams=True): the run's params and final / best metrics as an HParams
session, read back through TensorBoard's own HParams plugin (the data its dashboard shows)."""

import keras
import numpy as np
import pytest
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

import corebus
from corebus.integrations import TensorBoardLogger
from corebus.integrations.tensorboard_hparams import flatten_params
from corebus.testing import make_trainer, tiny_data, tiny_model

FIT = dict(batch_size=16, epochs=3, verbose=0, shuffle=False, validation_split=0.25)


def dashboard(parent):
    """What TensorBoard's HParams dashboard lists for ``--logdir parent``: the experiment and,
    per session (run directory), its hparams and the last value of each of its metrics."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(parent))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(parent))
    context = backend_context.Context(
        base_plugin.TBContext(data_provider=provider, multiplexer=multiplexer, logdir=str(parent))
    )
    request_context = tb_context.RequestContext()
    experiment = get_experiment.Handler(request_context, context, "", api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=100,
        aggregation_type=api_pb2.AGGREGATION_AVG,
        allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE],
    )
    for info in experiment.hparam_infos:
        request.col_params.add(hparam=info.name)
    for info in experiment.metric_infos:
        request.col_params.add(metric=info.name)
    groups = list_session_groups.Handler(request_context, context, "", request).run().session_groups
    sessions = {}
    for group in groups:
        (session,) = group.sessions
        hparams = {name: _value(value) for name, value in group.hparams.items()}
        metrics = {(m.name.group, m.name.tag): m.value for m in session.metric_values}
        sessions[session.name] = (hparams, metrics)
    return experiment, sessions


def _value(value):
    kind = value.WhichOneof("kind")
    return getattr(value, kind)


def expected_metrics(history):
    """final/<key> for every key; best/<key> for losses (min) and accuracies (max)."""
    metrics = {("", f"final/{k}"): v[-1] for k, v in history.items()}
    for key, values in history.items():
        if key.endswith("loss"):
            metrics["", f"best/{key}"] = min(values)
        elif key.endswith("accuracy"):
            metrics["", f"best/{key}"] = max(values)
    return metrics


def assert_metrics(metrics, history):
    shown = {key: value for key, value in metrics.items() if key[0] == ""}
    expected = expected_metrics(history)
    assert sorted(shown) == sorted(expected)
    np.testing.assert_allclose([shown[k] for k in sorted(expected)], [expected[k] for k in sorted(expected)], rtol=1e-6)


def test_runs_compare_in_the_hparams_dashboard(tmp_path):
    x, y = tiny_data()
    histories = {}
    for lr in (0.05, 0.5):
        logger = TensorBoardLogger(tmp_path / f"lr_{lr}", hparams=True, write_graph=False)
        trainer = make_trainer([logger], optimizer=keras.optimizers.SGD(lr))
        histories[f"lr_{lr}"] = trainer.fit(x, y, **FIT).history
    experiment, sessions = dashboard(tmp_path)
    assert sorted(sessions) == ["lr_0.05", "lr_0.5"]
    names = {info.name for info in experiment.hparam_infos}
    assert {
        "optimizer.default.learning_rate",
        "optimizer.default.name",
        "fit.batch_size",
        "fit.epochs",
        "model.loss",
        "model.trainable_params",
        "plugins.TensorBoardLogger.hparams",
    } <= names
    for run, history in histories.items():
        hparams, metrics = sessions[run]
        assert hparams["optimizer.default.learning_rate"] == pytest.approx(float(run.removeprefix("lr_")))
        assert (hparams["fit.batch_size"], hparams["fit.epochs"], hparams["model.loss"]) == (
            16,
            3,
            "sparse_categorical_crossentropy",
        )
        assert_metrics(metrics, history)
        # the epoch curves of train/ and validation/ belong to the same session
        assert metrics["validation", "epoch_loss"] == pytest.approx(history["val_loss"][-1], rel=1e-6)
        assert metrics["train", "epoch_accuracy"] == pytest.approx(history["accuracy"][-1], rel=1e-6)
    # the two runs differ where their training differed
    assert sessions["lr_0.5"][1]["", "best/val_loss"] != sessions["lr_0.05"][1]["", "best/val_loss"]


def test_hparams_inside_model_fit_come_from_keras_history(tmp_path):
    x, y = tiny_data()
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    logger = TensorBoardLogger(tmp_path / "fit", hparams=True, write_graph=False)
    history = model.fit(x, y, callbacks=[corebus.KerasCallback([logger])], **FIT).history
    _, sessions = dashboard(tmp_path)
    hparams, metrics = sessions["fit"]
    assert hparams["optimizer.default.name"].startswith("adam")  # Keras numbers names within a process (adam_51)
    assert hparams["optimizer.default.learning_rate"] == pytest.approx(0.01)
    assert_metrics(metrics, history)


def test_no_hparams_session_by_default(tmp_path):
    x, y = tiny_data()
    make_trainer([TensorBoardLogger(tmp_path / "run", write_graph=False)]).fit(x, y, **FIT)
    experiment, sessions = dashboard(tmp_path)
    assert sessions == {} and not list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_params_become_hparam_values():
    params = {
        "fit": {"batch_size": 16, "validation": True, "steps": None},
        "optimizer": {"default": {"learning_rate": 0.1, "name": "sgd"}},
        "model": {"metrics": ["accuracy", "auc"]},
    }
    assert flatten_params(params) == {
        "fit.batch_size": 16,
        "fit.validation": True,
        "optimizer.default.learning_rate": 0.1,
        "optimizer.default.name": "sgd",
        "model.metrics": '["accuracy", "auc"]',
    }
