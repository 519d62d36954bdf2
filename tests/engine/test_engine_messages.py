"""Messages the engine owes a user: a shape that does not fit, a loss that turned NaN, params
that are configuration (not plugin state)."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pytest

import corebus
from corebus import ConfigError
from corebus.testing import tiny_data, tiny_model

X, Y = tiny_data()


def test_an_input_shape_that_does_not_fit_the_model_says_so():
    with pytest.raises(ConfigError) as raised:
        corebus.Trainer(tiny_model(), loss="sparse_categorical_crossentropy").fit(
            np.zeros((96, 7), "float32"), Y, verbose=0
        )
    message = str(raised.value)
    assert "does not fit the model" in message and "(32, 7)" in message and "(None, 4)" in message
    assert "optimizer" not in message


def test_a_loss_that_turns_nan_is_one_warning_and_the_run_says_so(caplog):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    trainer = corebus.Trainer(model, loss="mse", optimizer=keras.optimizers.SGD(1e6))
    with caplog.at_level(logging.WARNING, logger="corebus"):
        trainer.fit(X, Y.astype("float32") * 1e6, epochs=3, verbose=0)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "terminate_on_nan" in warnings[0]
    assert trainer.loss_not_finite == (0, 1, 3)


def test_a_finite_run_has_no_nan_mark():
    trainer = corebus.Trainer(tiny_model(), loss="sparse_categorical_crossentropy")
    trainer.fit(X, Y, epochs=1, verbose=0)
    assert trainer.loss_not_finite is None


def test_run_params_are_configuration_only():
    trainer = corebus.Trainer(
        tiny_model(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        plugins=[
            {"name": "early_stopping", "monitor": "loss", "patience": 1},
            {"name": "reduce_lr_on_plateau", "monitor": "loss"},
        ],
    )
    trainer.fit(X, Y, epochs=2, verbose=0)
    params = trainer.run_params()
    json.dumps(params)
    early = params["plugins"]["early_stopping"]
    assert early["monitor"] == "loss" and early["patience"] == 1
    assert not {"wait", "best", "stopped_epoch", "best_weights"} & set(early)  # running state
    assert params["model"]["loss"] == "sparse_categorical_crossentropy"
    assert params["model"]["metrics"] == ["accuracy"]
    assert params["model"]["total_params"] == trainer.model.count_params()
