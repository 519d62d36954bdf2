"""Alert delivery: the gate (dedup, cooldown, threads), the log notifier, and the webhook
notifier against a real HTTP receiver on 127.0.0.1 (Slack / Discord / Teams / JSON shapes,
429 + Retry-After, 5xx, 4xx, a receiver that never answers, rate limit, the URL kept secret)."""

import json
import logging
import threading
import time

import pytest

from corebus import Alert, AlertGate, ConfigError, PluginBus, hookimpl
from corebus.engine.context import RunContext
from corebus.plugins.alert_log import AlertLog
from corebus.plugins.alert_webhook import AlertWebhook, truncate

from webhook_receiver import Receiver

STACK = "".join(f'  File "train.py", line {i}, in frame_{i}\n    step()\n' for i in range(300))


def alert(kind="stall", step=5, level="error", **kwargs):
    kwargs.setdefault("text", f"No training step completed for 2.0 s.\n```\n{STACK}```")
    return Alert(kind=kind, title="Training stalled", level=level, step=step, epoch=1, run="mnist", **kwargs)


def context(*plugins):
    """A run context with these plugins on its bus (no TensorFlow needed)."""
    ctx = RunContext()
    ctx._use_bus(PluginBus([(type(p).__name__, p) for p in plugins]))
    return ctx


class Collect:
    def __init__(self):
        self.alerts, self.active, self.overlapped = [], 0, False

    @hookimpl
    def on_alert(self, alert):
        self.active += 1
        self.overlapped |= self.active > 1
        time.sleep(0.001)
        self.alerts.append(alert)
        self.active -= 1


def deliver(notifier, *alerts, timeout=10.0):
    notifier.on_train_begin()
    for a in alerts:
        notifier.on_alert(alert=a)
    return notifier.close(timeout)


# ---------------------------------------------------------------------- the gate


def test_gate_drops_duplicates_and_holds_back_repeats_within_the_cooldown():
    gate = AlertGate(cooldown=60, cooldowns={"plateau": 0})
    assert gate.admit(alert("nan_loss", step=7), now=0) is not None
    assert gate.admit(alert("nan_loss", step=7), now=100) is None  # same condition, same step
    assert gate.admit(alert("nan_loss", step=8), now=10) is None  # cooldown
    assert gate.admit(alert("nan_loss", step=9), now=20) is None
    later = gate.admit(alert("nan_loss", step=10, text="t"), now=61)
    assert later is not None and "2 more 'nan_loss' alerts held back" in later.text
    assert gate.admit(alert("plateau", step=1), now=0) and gate.admit(alert("plateau", step=2), now=0)


def test_gate_sends_a_resolution_only_for_an_alert_that_went_out():
    gate = AlertGate(cooldown=60)
    resolved = dict(kind="stall_resolved", level="info", resolves="stall")
    assert gate.admit(alert(**resolved), now=0) is None  # nothing to resolve
    assert gate.admit(alert(step=1), now=0) is not None
    assert gate.admit(alert(step=2, **resolved), now=1) is not None
    assert gate.admit(alert(step=3), now=2) is None  # a second stall inside the cooldown...
    assert gate.admit(alert(step=4, **resolved), now=3) is None  # ...and so its resolution


def test_gate_state_survives_json_and_keeps_the_cooldown():
    gate = AlertGate(cooldown=60)
    gate.admit(alert(step=1))
    gate.admit(alert(step=2))
    restored = AlertGate(cooldown=60)
    restored.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert restored.state_dict() == gate.state_dict()
    assert restored.admit(alert(step=3)) is None


def test_alerts_from_many_threads_reach_subscribers_one_at_a_time():
    collect = Collect()
    ctx = context(collect)
    ctx.alert_gate = AlertGate(cooldown=0)

    def raise_alerts(worker):
        for i in range(25):
            ctx.global_step = worker * 1000 + i  # distinct steps: no duplicates
            ctx.alert(f"kind{worker}", "t", str(i))

    threads = [threading.Thread(target=raise_alerts, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not collect.overlapped
    assert len(collect.alerts) == 150
    for w in range(6):  # each thread's alerts in the order it raised them
        assert [a.text for a in collect.alerts if a.kind == f"kind{w}"] == [str(i) for i in range(25)]


def test_trainer_alert_returns_none_when_held_back():
    collect = Collect()
    ctx = context(collect)
    first = ctx.alert("stall", "Training stalled", "x", "warning")
    assert first is not None and (first.kind, first.step, first.level) == ("stall", 0, "warning")
    assert ctx.alert("stall", "Training stalled", "x") is None
    assert collect.alerts == [first]


# ---------------------------------------------------------------------- log notifier


def test_alert_log_writes_the_logger_and_a_jsonl_file(tmp_path, caplog):
    path = tmp_path / "alerts.jsonl"
    notifier = AlertLog(path=str(path), min_level="warning")
    with caplog.at_level(logging.INFO, logger="corebus.alerts"):
        assert deliver(notifier, alert(level="info", kind="a"), alert(kind="b", details="all stacks"))
    (record,) = [r for r in caplog.records if r.name == "corebus.alerts"]
    assert record.levelno == logging.ERROR and "[b] Training stalled (step 5, mnist" in record.getMessage()
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["details"] == "all stacks"


# ---------------------------------------------------------------------- webhook notifier


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def test_slack_payload(receiver):
    assert deliver(AlertWebhook(url=receiver.url, format="slack"), alert())
    (body,) = receiver.bodies()
    assert list(body) == ["text"]
    text = body["text"]
    assert text.startswith("\U0001f6a8 *Training stalled*\n_error | mnist, step 5, epoch 1, rank 0 on ")
    assert "No training step completed" in text and "in frame_299" in text  # innermost frames kept
    assert len(text) <= 3500 and "characters cut" in text and text.count("```") == 2
    assert receiver.requests[0]["headers"]["Content-Type"].startswith("application/json")


def test_discord_payload_fits_its_2000_character_limit(receiver):
    assert deliver(AlertWebhook(url=receiver.url, format="discord"), alert())
    (body,) = receiver.bodies()
    assert list(body) == ["content"] and len(body["content"]) <= 2000
    assert body["content"].startswith("\U0001f6a8 **Training stalled**") and "in frame_299" in body["content"]


def test_teams_payload_is_an_adaptive_card(receiver):
    resolved = alert("stall_resolved", level="info", resolves="stall", text="Progress again at step 6.")
    assert deliver(AlertWebhook(url=receiver.url, format="teams", min_interval=0), alert(), resolved)
    stall, done = receiver.bodies()
    assert stall["type"] == "message"
    (attachment,) = stall["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    title, facts, summary, stack = card["body"]
    assert title["text"].endswith("Training stalled") and title["color"] == "Attention"
    assert {f["title"]: f["value"] for f in facts["facts"]}["Step"] == "5"
    assert summary["text"].startswith("No training step completed")
    assert stack["fontType"] == "Monospace" and "in frame_299" in stack["text"]
    assert done["attachments"][0]["content"]["body"][0]["color"] == "Good"


def test_json_payload_carries_every_field(receiver):
    sent = alert(details="Thread MainThread:\n" + STACK)
    assert deliver(AlertWebhook(url=receiver.url, format="json"), sent)
    (body,) = receiver.bodies()
    assert body == json.loads(json.dumps(sent.to_dict()))


def test_429_with_retry_after_then_200_delivers_the_alert_once():
    with Receiver(answers=[(429, {"Retry-After": "1"}), 200]) as receiver:
        notifier = AlertWebhook(url=receiver.url)
        assert deliver(notifier, alert())
        first, second = receiver.requests
        assert (first["status"], second["status"]) == (429, 200)
        assert 0.9 <= second["time"] - first["time"] < 3.0  # waited as told, not its own backoff
        assert first["json"] == second["json"] and notifier.delivered == 1


def test_discord_style_429_body_and_5xx_are_retried():
    answers = [(429, {}), 503, 200]
    with Receiver(answers=answers) as receiver:
        receiver.answers[0] = (429, {})  # no header: falls back to backoff (0.5 s), then 503 -> 1 s
        notifier = AlertWebhook(url=receiver.url, min_interval=0)
        assert deliver(notifier, alert())
        assert [r["status"] for r in receiver.requests] == [429, 503, 200]
        assert notifier.delivered == 1


def test_a_refused_alert_is_dropped_not_retried(caplog):
    with Receiver(answers=[404, 200]) as receiver:
        notifier = AlertWebhook(url=receiver.url, min_interval=0)
        with caplog.at_level(logging.ERROR, logger="corebus"):
            assert deliver(notifier, alert(), alert(kind="other"))
        assert [r["status"] for r in receiver.requests] == [404, 200]
        assert (notifier.dropped, notifier.delivered) == (1, 1)
        assert "HTTP 404" in caplog.text and receiver.url not in caplog.text


def test_a_receiver_that_never_answers_does_not_block_the_caller():
    with Receiver(hang=True) as receiver:
        notifier = AlertWebhook(url=receiver.url, timeout=1.0, min_interval=0, shutdown_timeout=1.0)
        notifier.on_train_begin()
        ctx = context(notifier)
        ctx.alert_gate = AlertGate(cooldown=0)
        slowest = 0.0
        for step in range(20):
            ctx.global_step = step
            start = time.perf_counter()
            ctx.alert("stall", "Training stalled", "x")
            slowest = max(slowest, time.perf_counter() - start)
        assert slowest < 0.05
        start = time.perf_counter()
        assert not notifier.close()  # undelivered, and bounded in time
        assert time.perf_counter() - start < 3.5
        assert receiver.wait_for(1, timeout=1)


def test_rate_limit_spaces_posts_to_one_channel(receiver):
    assert deliver(AlertWebhook(url=receiver.url, min_interval=0.4), alert(step=1), alert(step=2), alert(step=3))
    times = [r["time"] for r in receiver.requests]
    assert len(times) == 3 and all(b - a >= 0.35 for a, b in zip(times, times[1:]))


def test_the_url_is_a_secret(receiver, monkeypatch, caplog):
    monkeypatch.setenv("MY_SLACK_URL", receiver.url)
    notifier = AlertWebhook(url_env="MY_SLACK_URL")
    assert receiver.url not in repr(notifier) + json.dumps(notifier.get_config())
    assert not hasattr(notifier, "state_dict")
    ctx = context(notifier)
    assert receiver.url not in json.dumps(ctx.run_params()) + json.dumps(ctx.bus.state_dict())
    with caplog.at_level(logging.DEBUG):
        assert deliver(notifier, alert())
        dead = AlertWebhook(url=receiver.url.replace(str(receiver.server.server_address[1]), "9"), timeout=0.5)
        assert not deliver(dead, alert(), timeout=0.3)
    assert len(receiver.bodies()) == 1
    assert "send failed" in caplog.text and "secret-token" not in caplog.text


def test_bad_configuration_fails_before_training(monkeypatch):
    monkeypatch.delenv("COREBUS_ALERT_WEBHOOK_URL", raising=False)
    with pytest.raises(ConfigError, match="set the environment variable COREBUS_ALERT_WEBHOOK_URL"):
        AlertWebhook()
    with pytest.raises(ConfigError, match="format='email'"):
        AlertWebhook(url="https://example.invalid/x", format="email")
    with pytest.raises(ConfigError, match="https://"):
        AlertWebhook(url="ftp://example.invalid/x")


def test_truncate_keeps_head_and_tail():
    text = "head " + "x" * 10_000 + " tail"
    short = truncate(text, 500)
    assert len(short) <= 500 and short.startswith("head ") and short.endswith(" tail")
