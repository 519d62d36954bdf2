"""corebus.redact: secrets in URLs, webhook tokens and ${VAR} values never reach an output."""

import pytest

from corebus import redact
from corebus.delivery.sinks import _SECRETS, redact_text, register_secret


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "send failed to http://alice:s3cr%40t@mlflow.example:5000/api/2.0 (503)",
            "send failed to http://alice:***@mlflow.example:5000/api/2.0 (503)",
        ),
        (
            "https://user:pa:ss@host/x and postgresql://db:hunter2@db.local/mlflow",
            "https://user:***@host/x and postgresql://db:***@db.local/mlflow",
        ),
        ("https://hooks.slack.com/services/T000AAA/B000BBB/XXXXXXXXXXXXXXXX", "https://hooks.slack.com/services/***"),
        ("https://discord.com/api/webhooks/123456789/AbC-dEf_123", "https://discord.com/api/webhooks/123456789/***"),
        (
            "https://notify.example/hook?channel=ml&token=abc123&x=1",
            "https://notify.example/hook?channel=ml&token=***&x=1",
        ),
        ("https://api.example/v1?API_KEY=zzz#frag", "https://api.example/v1?API_KEY=***#frag"),
        ("https://blob.example/c/f?sv=2024&sig=Zm9v%2Bbar&se=1", "https://blob.example/c/f?sv=2024&sig=***&se=1"),
        ("'https://h.example/p?client_secret=s3'", "'https://h.example/p?client_secret=***'"),
    ],
)
def test_secrets_in_urls_are_redacted_and_the_rest_kept(text, expected):
    assert redact_text(text) == expected
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "http://mlflow.example:5000/#/experiments/1?page=2",
        "file:///tmp/mlruns",
        "sqlite:///mlflow.db",
        "val_loss improved from 0.5 to 0.4",
        "user@example.com",
    ],
)
def test_text_without_secrets_is_unchanged(text):
    assert redact_text(text) == text


def test_a_registered_secret_is_redacted_inside_any_string(monkeypatch):
    monkeypatch.setattr("corebus.delivery.sinks._SECRETS", set(_SECRETS))
    register_secret("tok-9f8e7d")
    config = {
        "tracking_uri": "http://u:pw@h",
        "notes": ["sent with tok-9f8e7d twice: tok-9f8e7d"],
        "url": "https://h/x",
        "n": 3,
    }
    assert redact(config) == {
        "tracking_uri": "http://u:***@h",
        "notes": ["sent with *** twice: ***"],
        "url": "***",
        "n": 3,
    }
