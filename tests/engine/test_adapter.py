"""One plugin, written once, runs unchanged in Trainer.fit and in model.fit via the adapter."""

import numpy as np

import corebus
from corebus.testing import RecordingPlugin, fit_both_ways, make_trainer, tiny_model


def test_same_event_sequence_in_both_modes(tiny_data):
    x, y = tiny_data
    (engine, engine_history), (keras_plugins, keras_history) = fit_both_ways(
        lambda: [RecordingPlugin(read_logs=True)], x, y, batch_size=16, epochs=3, validation_split=0.25
    )
    engine_events, keras_events = engine[0].events, keras_plugins[0].events
    assert [e[0] for e in engine_events] == [e[0] for e in keras_events]
    assert len(engine_events) == len(keras_events) > 50
    for ours, theirs in zip(engine_events, keras_events):
        assert ours[:-1] == theirs[:-1] or ours == theirs
        if isinstance(ours[-1], dict):
            assert ours[-1].keys() == theirs[-1].keys(), ours[0]
            measured = [k for k in ours[-1] if k != "steps_per_second"]  # a wall-clock rate
            if ours[:2] == ("on_log", "batch"):
                # the engine logs each step's own values, model.fit only has running means
                # (tests/engine/test_step_values.py checks both)
                continue
            np.testing.assert_allclose(
                [ours[-1][k] for k in measured], [theirs[-1][k] for k in measured], rtol=1e-4, atol=1e-5
            )
    # the documented order of one epoch
    names = [e[0] for e in engine_events]
    first_epoch = names[: names.index("on_epoch_end") + 2]
    assert first_epoch[:3] == ["on_train_begin", "on_epoch_begin", "on_train_batch_begin"]
    assert first_epoch[3:5] == ["on_train_batch_end", "on_log"]
    assert first_epoch[-4:] == ["on_test_batch_end", "on_test_end", "on_epoch_end", "on_log"]
    assert names[-1] == "on_train_end"
    epoch_logs = [e for e in engine_events if e[:2] == ("on_log", "epoch")]
    assert "learning_rate" in epoch_logs[0][3] and "val_loss" in epoch_logs[0][3]


def test_evaluate_and_predict_events_in_both_modes(tiny_data):
    x, y = tiny_data
    engine_rec, keras_rec = RecordingPlugin(read_logs=True), RecordingPlugin(read_logs=True)
    trainer = make_trainer([engine_rec])
    trainer.evaluate(x, y, batch_size=32, verbose=0)
    trainer.predict(x, batch_size=32, verbose=0)
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callback = corebus.KerasCallback([keras_rec])
    model.evaluate(x, y, batch_size=32, verbose=0, callbacks=[callback])
    model.predict(x, batch_size=32, verbose=0, callbacks=[callback])
    assert [e[:2] for e in engine_rec.events] == [e[:2] for e in keras_rec.events]
    assert engine_rec.names() == (
        ["on_test_begin"]
        + ["on_test_batch_begin", "on_test_batch_end"] * 3
        + ["on_test_end"]
        + ["on_predict_begin"]
        + ["on_predict_batch_begin", "on_predict_batch_end"] * 3
        + ["on_predict_end"]
    )
    np.testing.assert_allclose(
        list(engine_rec.events[-9][1].values()), list(keras_rec.events[-9][1].values()), rtol=1e-5
    )


def test_plugins_from_names_and_config_in_the_adapter(tiny_data, tmp_path):
    config = tmp_path / "plugins.yaml"
    config.write_text("plugins:\n  - name: progress\n    interval: 60\n")
    callback = corebus.KerasCallback(str(config))
    assert list(callback.bus.plugins) == ["progress"]
    assert "on_train_batch_end" in callback.bus.describe()
