import keras
import pytest


@pytest.fixture(autouse=True)
def _interactive_logging():
    yield
    keras.config.enable_interactive_logging()  # a test that turned it off must not leak it
