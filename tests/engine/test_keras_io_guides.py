"""keras.io's "Writing a training loop from scratch" and "Customizing what happens in fit()"
guides, written as corebus programs (examples/keras_io_*.py): each runs (``--quick``) and its
corebus results equal ``model.fit``'s on the same run, computed in the example itself."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name, *argv):
    spec = importlib.util.spec_from_file_location(f"corebus_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # keras looks classes up by module
    spec.loader.exec_module(module)
    return module.main(list(argv))


def same_history(ours, theirs, keys):
    for key in keys:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6, err_msg=key)


def same_weights(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_loop_from_scratch_matches_model_fit(capsys):
    results = run_example("keras_io_training_loop", "--quick")
    fit = results["fit"]
    assert len(fit["val_accuracy"]) == 3 and fit["val_accuracy"][-1] > fit["val_accuracy"][0]  # it learns
    # the hand-written loop (the "before") and the corebus step (the "after") both end as model.fit
    same_history(results["loop"], fit, ["accuracy", "val_accuracy"])
    same_history(results["corebus"], fit, ["loss", "accuracy", "val_loss", "val_accuracy"])
    same_weights(results["weights"]["loop"], results["weights"]["fit"])
    same_weights(results["weights"]["corebus"], results["weights"]["fit"])
    assert "largest weight difference from model.fit" in capsys.readouterr().out


@pytest.fixture(scope="module")
def custom_fit():
    return run_example("keras_io_custom_fit", "--quick")


@pytest.mark.parametrize("kind", ["CompiledStep", "OwnMetrics"])
def test_a_model_with_its_own_train_step_trains_in_corebus_as_in_model_fit(custom_fit, kind):
    ours, theirs = custom_fit[kind]["corebus"], custom_fit[kind]["fit"]
    assert set(ours["history"]) == set(theirs["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    same_history(ours["history"], theirs["history"], sorted(theirs["history"]))
    # the model's metrics were reset at each epoch, as model.fit resets them: the losses fall
    assert theirs["history"]["loss"][-1] < theirs["history"]["loss"][0]
    same_weights(ours["weights"], theirs["weights"])
    assert ours["evaluation"] == pytest.approx(theirs["evaluation"], rel=1e-5)  # its own test_step
