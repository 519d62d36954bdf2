"""One rule per kind of plugin parameter (corebus.kit.check_number / check_choice): the same
parameter gets the same range and the same message in every plugin and logger."""

import numpy as np
import pytest

from corebus import ConfigError
from corebus.integrations import MLflowLogger, TensorBoardLogger, WandbLogger
from corebus.kit import check_choice, check_number
from corebus.plugins import EarlyStopping, StallAlert, TerminateOnNaN


def test_a_number_out_of_range_names_the_owner_the_parameter_and_the_rule():
    with pytest.raises(ConfigError, match=r"^Owner: timeout=-1 must be > 0 seconds \(or None\)$"):
        check_number("Owner", "timeout", -1, above=0, unit="seconds", allow_none=True)
    with pytest.raises(ConfigError, match=r"^Owner: drop=1.5 must be > 0 and < 1$"):
        check_number("Owner", "drop", 1.5, above=0, below=1)
    with pytest.raises(ConfigError, match=r"^Owner: every=2.5 must be an integer >= 1 steps$"):
        check_number("Owner", "every", 2.5, at_least=1, integer=True, unit="steps")


@pytest.mark.parametrize("value", [True, "3", None, float("nan")])
def test_bools_strings_none_and_nan_are_not_numbers(value):
    with pytest.raises(ConfigError):
        check_number("Owner", "n", value, at_least=0)


def test_numpy_scalars_and_none_where_allowed_pass():
    check_number("Owner", "n", np.int64(3), at_least=1, integer=True)
    check_number("Owner", "x", np.float32(0.5), above=0, below=1)
    check_number("Owner", "n", None, at_least=1, allow_none=True)
    EarlyStopping(patience=np.int64(2))  # a patience read from a NumPy config array


def test_a_name_outside_its_set_lists_the_choices():
    check_choice("Owner", "mode", "min", ("min", "max"))
    with pytest.raises(ConfigError, match=r"^Owner: mode='best' is unknown; use one of min, max$"):
        check_choice("Owner", "mode", "best", ("min", "max"))


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp, t: TensorBoardLogger(log_dir=str(tmp / "tb"), shutdown_timeout=t),
        lambda tmp, t: MLflowLogger(tracking_uri=f"sqlite:///{tmp}/mlflow.db", shutdown_timeout=t),
        lambda tmp, t: WandbLogger(mode="offline", dir=str(tmp), shutdown_timeout=t),
    ],
    ids=["tensorboard", "mlflow", "wandb"],
)
def test_every_logger_takes_shutdown_timeout_on_one_rule(tmp_path, make):
    # 0 means "do not wait at the end" (what is left is spooled): the same for every logger.
    assert make(tmp_path, 0).shutdown_timeout == 0
    for bad in (-1, True):
        with pytest.raises(ConfigError, match=rf"shutdown_timeout={bad!r} must be >= 0 seconds$"):
            make(tmp_path, bad)


def test_plugins_say_their_ranges_the_same_way():
    with pytest.raises(ConfigError, match=r"^StallAlert: timeout=0 must be > 0 seconds \(or None\)$"):
        StallAlert(timeout=0)
    with pytest.raises(ConfigError, match=r"^TerminateOnNaN: check_every=0 must be an integer >= 1 steps$"):
        TerminateOnNaN(check_every=0)
    with pytest.raises(ConfigError, match=r"^EarlyStopping: patience=-1 must be an integer >= 0 epochs$"):
        EarlyStopping(patience=-1)
