"""MLflowLogger's MLflow Model (flavor, signature, input example, Model Registry), system metrics
and datasets, on a local sqlite store read back with MLflow's own client and loaders."""

import time

import keras
import numpy as np
import pytest

from corebus import KerasCallback, hookimpl
from corebus.integrations import MLflowLogger
from corebus.plugins import ModelCheckpoint
from corebus.testing import make_trainer, tiny_data, tiny_model


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A sqlite store; MLflow's fluent loaders (``models:/``) read the global tracking URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    return uri


def client_of(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def logger(store, tmp_path, **kwargs):
    return MLflowLogger(
        tracking_uri=store,
        experiment_name="models",
        dir=tmp_path / "mlflow",
        shutdown_timeout=60,
        log_every_n_steps=None,
        **kwargs,
    )


class Pause:
    """Time for MLflow's system-metrics sampler to take a few samples once the sink has opened
    the run (at the first epoch record; the first delivery to a new sqlite store takes seconds)."""

    def __init__(self, mlflow_logger):
        self.mlflow_logger = mlflow_logger

    @hookimpl
    def on_epoch_begin(self, epoch):
        if epoch == 0:
            return
        deadline = time.monotonic() + 60
        while self.mlflow_logger.run_id is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)


def test_the_best_checkpoints_weights_are_registered_and_pyfunc_predicts_like_them(store, tmp_path):
    import mlflow

    x, y = tiny_data(96)
    # mode="max" on a falling val_loss: the best checkpoint is an early one, not the final weights
    checkpoint = ModelCheckpoint(
        str(tmp_path / "ckpt" / "ep{epoch:02d}.weights.h5"),
        save_weights_only=True,
        monitor="val_loss",
        mode="max",
        save_top_k=1,
    )
    mlflow_logger = logger(store, tmp_path, log_model="best", registered_model_name="tiny")
    trainer = make_trainer([mlflow_logger, checkpoint], optimizer=keras.optimizers.SGD(0.5))
    history = trainer.fit(x, y, batch_size=8, epochs=4, validation_split=0.25, verbose=0, shuffle=False).history
    best_epoch = int(np.argmax(history["val_loss"]))
    assert best_epoch < 3  # else best and last would be the same weights

    client = client_of(store)
    (version,) = client.search_model_versions("name='tiny'")
    run = client.get_run(mlflow_logger.run_id)
    assert run.info.status == "FINISHED"
    assert version.run_id == run.info.run_id
    assert version.tags["run_id"] == run.info.run_id and version.tags["weights"] == "best"
    assert version.tags["monitor"] == "val_loss" and int(version.tags["best_epoch"]) == best_epoch
    assert float(version.tags["best_value"]) == pytest.approx(history["val_loss"][best_epoch], rel=1e-6)
    (output,) = run.outputs.model_outputs  # the run's LoggedModel, as mlflow.keras.log_model makes it
    assert version.source == client.get_logged_model(output.model_id).artifact_location

    # Keras is the oracle: the best file loaded into the same architecture
    best = tiny_model()
    best.load_weights(str(tmp_path / "ckpt" / f"ep{best_epoch + 1:02d}.weights.h5"))
    loaded = mlflow.pyfunc.load_model(f"models:/tiny/{version.version}")
    np.testing.assert_allclose(loaded.predict(x), best.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(loaded.predict(x), trainer.model.predict(x, verbose=0), atol=1e-4)

    info = mlflow.models.get_model_info(f"models:/tiny/{version.version}")
    assert "keras" in info.flavors and "python_function" in info.flavors
    (spec,) = info.signature.inputs.inputs
    assert spec.shape == (-1, 4) and spec.type == np.dtype("float32")
    assert info.signature.outputs.inputs[0].shape == (-1, 3)
    example = mlflow.models.Model.load(f"models:/tiny/{version.version}").load_input_example(
        mlflow.artifacts.download_artifacts(f"models:/tiny/{version.version}")
    )
    np.testing.assert_array_equal(example, x[:5])


@pytest.mark.parametrize("log_model", [True, "last"])
def test_inside_model_fit_the_last_weights_are_an_mlflow_model(store, tmp_path, log_model):
    """True means the final weights, as ``mlflow.keras.autolog`` logs them; inside ``model.fit``
    the signature comes from the model's inputs (Keras shows callbacks no data)."""
    import mlflow

    x, y = tiny_data(64)
    mlflow_logger = logger(store, tmp_path, log_model=log_model)
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[KerasCallback([mlflow_logger])])
    run = client_of(store).get_run(mlflow_logger.run_id)
    (output,) = run.outputs.model_outputs
    loaded = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    np.testing.assert_allclose(loaded.predict(x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert loaded.metadata.signature.inputs.inputs[0].shape == (-1, 4)
    assert run.info.status == "FINISHED"


def test_a_model_that_cannot_be_logged_leaves_the_run_finished_with_a_warning(store, tmp_path, caplog):
    """A custom layer Keras can save but not load back (not registered): the run still finished
    training, so it stays FINISHED; the warning and a run tag say what went wrong."""

    class Doubler(keras.layers.Layer):  # local: keras.saving cannot find it again
        def call(self, inputs):
            return inputs * 2.0

    x, y = tiny_data(32)
    model = keras.Sequential([keras.Input((4,)), Doubler(), keras.layers.Dense(3, activation="softmax")])
    mlflow_logger = logger(store, tmp_path, log_model=True, registered_model_name="never")
    with caplog.at_level("WARNING", logger="corebus"):
        make_trainer([mlflow_logger], model=model).fit(x, y, batch_size=8, epochs=1, verbose=0)
    run = client_of(store).get_run(mlflow_logger.run_id)
    assert run.info.status == "FINISHED"
    assert "Doubler" in run.data.tags["corebus.log_model_error"]
    assert "could not log the model" in caplog.text
    assert not client_of(store).search_model_versions("name='never'")
    assert not list((tmp_path / "mlflow").glob("*.spool.jsonl"))  # not retried forever


def test_system_metrics_come_from_mlflows_own_monitor(store, tmp_path):
    x, y = tiny_data(64)
    mlflow_logger = logger(store, tmp_path, system_metrics=0.2)
    make_trainer([mlflow_logger, Pause(mlflow_logger)]).fit(x, y, batch_size=8, epochs=4, verbose=0)
    client = client_of(store)
    run = client.get_run(mlflow_logger.run_id)
    assert run.info.status == "FINISHED"
    points = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(points) >= 2 and all(0 <= p.value <= 100 for p in points)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    # off: no system/ metrics (the default follows MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, unset here)
    quiet = logger(store, tmp_path)
    assert quiet.system_metrics is False
    make_trainer([quiet, Pause(quiet)]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert not [k for k in client.get_run(quiet.run_id).data.metrics if k.startswith("system/")]


def test_datasets_are_recorded_with_mlflow_data_as_autolog_records_them(store, tmp_path):
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.types.schema import TensorSpec

    x, y = tiny_data(96)
    mlflow_logger = logger(store, tmp_path, log_datasets=True)
    make_trainer([mlflow_logger]).fit(x, y, batch_size=8, epochs=1, validation_split=0.25, verbose=0)
    run = client_of(store).get_run(mlflow_logger.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["eval", "train"]
    # MLflow is the oracle: the same arrays through mlflow.data give the same digest and profile
    for context, rows in (("train", slice(0, 72)), ("eval", slice(72, 96))):
        expected = from_numpy(features=x[rows], targets=y[rows], name=context)
        assert inputs[context].name == context
        assert inputs[context].digest == expected.digest
        assert inputs[context].profile == expected.to_dict()["profile"]
        assert '"features_shape": [%d, 4]' % (rows.stop - rows.start) in inputs[context].profile
        assert inputs[context].schema == expected.to_dict()["schema"]
        (spec,) = expected.schema.features.inputs
        assert isinstance(spec, TensorSpec) and spec.shape == (-1, 4)


def test_datasets_of_a_tf_data_input_and_the_model_fit_warning(store, tmp_path, caplog):
    import tensorflow as tf

    x, y = tiny_data(64)
    mlflow_logger = logger(store, tmp_path, log_datasets=True, log_model=True)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    make_trainer([mlflow_logger]).fit(dataset, epochs=1, verbose=0)
    run = client_of(store).get_run(mlflow_logger.run_id)
    (only,) = run.inputs.dataset_inputs
    assert only.tags[0].value == "train" and only.dataset.source_type == "code"
    assert run.outputs.model_outputs  # input example cut from the dataset's first batch

    inside = logger(store, tmp_path, log_datasets=True)
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with caplog.at_level("WARNING", logger="corebus"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[KerasCallback([inside])])
    assert "log_datasets needs the data" in caplog.text
    assert not client_of(store).get_run(inside.run_id).inputs.dataset_inputs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"log_model": "best_only"}, "log_model='best_only'"),
        ({"registered_model_name": "x"}, "registered_model_name needs log_model"),
        ({"log_model": True, "registered_model_name": " "}, "registered_model_name=' '"),
        ({"system_metrics": -1}, "system_metrics=-1"),
        ({"system_metrics": "on"}, "system_metrics='on'"),
    ],
)
def test_bad_model_options_fail_before_training(tmp_path, kwargs, match):
    from corebus import ConfigError

    with pytest.raises(ConfigError, match=match):
        MLflowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", dir=tmp_path / "mlflow", **kwargs)


def test_with_an_isolated_client_the_model_and_datasets_are_logged_from_the_child(store, tmp_path):
    import mlflow

    x, y = tiny_data(64)
    mlflow_logger = logger(store, tmp_path, log_model=True, log_datasets=True, isolate_sdk=True)
    trainer = make_trainer([mlflow_logger])
    trainer.fit(x, y, batch_size=8, epochs=1, verbose=0)
    run = client_of(store).get_run(mlflow_logger.run_id)
    assert [i.tags[0].value for i in run.inputs.dataset_inputs] == ["train"]
    (output,) = run.outputs.model_outputs
    loaded = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    np.testing.assert_allclose(loaded.predict(x), trainer.model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
