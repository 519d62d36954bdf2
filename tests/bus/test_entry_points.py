"""A third-party plugin distribution, installed for real, found by name and run both ways."""

import json
import subprocess
import sys
import textwrap

import pytest

import corebus
from corebus.bus.registry import installed_plugins, resolve_all

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "corebus-epoch-counter"
version = "1.2.3"

[project.entry-points."corebus.plugins"]
epoch_counter = "corebus_epoch_counter:EpochCounter"
"""

PLUGIN = '''
from corebus import hookimpl


class EpochCounter:
    """Counts epochs and steps; stops training after `stop_after` epochs."""

    def __init__(self, stop_after=100):
        self.stop_after = stop_after
        self.epochs = 0
        self.last_step = None

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        self.epochs += 1
        self.last_step = trainer.global_step
        if self.epochs >= self.stop_after:
            trainer.stop_training = True
'''


@pytest.fixture(scope="module")
def third_party_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("thirdparty")
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "corebus_epoch_counter.py").write_text(textwrap.dedent(PLUGIN))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "-q", str(root)], check=True)
    import importlib

    importlib.invalidate_caches()
    yield "epoch_counter"
    subprocess.run(pip + ["uninstall", "-y", "-q", "corebus-epoch-counter"], check=True)


@pytest.mark.slow
def test_discovered_listed_and_run_in_both_modes(third_party_plugin, tiny_data):
    info = {i.name: i for i in installed_plugins()}[third_party_plugin]
    assert (info.distribution, info.version, info.hooks) == ("corebus-epoch-counter", "1.2.3", ["on_epoch_end"])

    listing = subprocess.run(
        [sys.executable, "-m", "corebus", "plugins", "--json"], capture_output=True, text=True, check=True
    )
    assert {"name": "epoch_counter", "distribution": "corebus-epoch-counter"}.items() <= {
        k: v for k, v in next(p for p in json.loads(listing.stdout) if p["name"] == "epoch_counter").items()
    }.items()

    x, y = tiny_data
    spec = {"name": third_party_plugin, "stop_after": 2}
    (engine, engine_history), (keras_plugins, keras_history) = corebus.testing.fit_both_ways(
        lambda: [plugin for _, plugin in resolve_all([spec])], x, y, batch_size=32, epochs=5
    )
    assert engine[0].epochs == keras_plugins[0].epochs == 2
    assert engine[0].last_step == keras_plugins[0].last_step == 6
    assert engine_history.epoch == keras_history.epoch == [0, 1]

    with pytest.raises(corebus.ConfigError, match=r"epoch_counter.*bad params.*stop_after"):
        resolve_all([{"name": third_party_plugin, "stop_afterr": 2}])
