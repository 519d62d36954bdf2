"""Alerts to a chat channel or any HTTP receiver: Slack, Discord, Microsoft Teams, generic JSON."""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from corebus import Alert, AlertOutbox, ConfigError, RetryLater, hookimpl
from corebus.kit import check_choice, check_number

log = logging.getLogger("corebus")

FORMATS = ("slack", "discord", "teams", "json")
DEFAULT_URL_ENV = "COREBUS_ALERT_WEBHOOK_URL"
# Characters of message text each service takes (Discord refuses > 2000; Slack truncates
# long texts; a Teams card must stay under ~28 KB).
LIMITS = {"slack": 3500, "discord": 1900, "teams": 15000, "json": 100_000}
_ICONS = {"info": "\u2139\ufe0f", "warning": "\u26a0\ufe0f", "error": "\U0001f6a8", "resolved": "\u2705"}
_TEAMS_COLORS = {"info": "Default", "warning": "Warning", "error": "Attention", "resolved": "Good"}


class AlertWebhook:
    """POST every alert to a webhook: ``format`` is ``"slack"`` (``{"text": ...}``), ``"discord"``
    (``{"content": ...}``), ``"teams"`` (an Adaptive Card for a Teams Workflows webhook) or
    ``"json"`` (the alert's fields, details included).

    The URL is a secret: pass ``url=`` or (better) set the environment variable named by
    ``url_env``. It is kept out of :meth:`get_config` (so out of run params), ``repr``, logs
    and checkpoints.

    Delivery never touches the thread that raised the alert: a :class:`corebus.LogSink` worker
    posts, one alert per request, at most one request per ``min_interval`` seconds per URL
    (Slack's webhook limit is about one a second), each with a ``timeout``; a 429 or 5xx is
    retried after the ``Retry-After`` the service sent (or with backoff); other 4xx answers
    (a revoked webhook, a refused payload) are logged and the alert dropped, since repeating
    them cannot help. At the end of training, undelivered alerts get ``shutdown_timeout`` seconds.
    """

    error_policy = "warn"  # a notifier must never stop training

    # Per channel (URL), shared by every instance posting there.
    _last_post: dict[str, float] = {}
    _rate_lock = threading.Lock()

    def __init__(
        self,
        url: str | None = None,
        format: str = "slack",
        url_env: str = DEFAULT_URL_ENV,
        min_level: str = "info",
        timeout: float = 5.0,
        min_interval: float = 1.0,
        max_backoff: float = 60.0,
        shutdown_timeout: float = 5.0,
    ):
        check_choice("AlertWebhook", "format", format, FORMATS)
        check_number("AlertWebhook", "timeout", timeout, above=0, unit="seconds")
        url = url or os.environ.get(url_env)
        if not url:
            raise ConfigError(f"AlertWebhook: no webhook URL; set the environment variable {url_env} (or pass url=...)")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError("AlertWebhook: the webhook URL must start with https:// (or http://)")
        self._url = url
        self._channel = hashlib.sha256(url.encode()).hexdigest()
        self.format = format
        self.url_env = url_env
        self.min_level = min_level
        self.timeout = float(timeout)
        self.min_interval = float(min_interval)
        self.max_backoff = float(max_backoff)
        self.shutdown_timeout = float(shutdown_timeout)
        self.delivered = 0
        self.dropped = 0
        self._outbox = AlertOutbox(
            f"alert_webhook-{format}",
            self._send,
            min_level,
            owner="AlertWebhook",
            max_backoff=self.max_backoff,
            shutdown_timeout=self.shutdown_timeout,
        )

    def __repr__(self) -> str:
        return f"AlertWebhook(format={self.format!r}, url='***')"

    def get_config(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "url_env": self.url_env,
            "min_level": self.min_level,
            "timeout": self.timeout,
            "min_interval": self.min_interval,
        }

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def on_train_begin(self):
        self._outbox.open()

    @hookimpl
    def on_alert(self, alert: Alert):
        self._outbox.put(alert)

    # Last, so alerts other plugins raise in their own end hooks still go out.
    @hookimpl(trylast=True)
    def on_train_end(self):
        self.close()

    @hookimpl(trylast=True)
    def on_exception(self):
        self.close()

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is queued within ``timeout`` (default ``shutdown_timeout``) seconds."""
        return self._outbox.close(timeout)

    # ---------------------------------------------------------------- worker thread

    def _send(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._wait_for_slot()
            self._post(json.dumps(payload(record, self.format)).encode("utf-8"))

    def _wait_for_slot(self) -> None:
        with self._rate_lock:
            now = time.monotonic()
            start = max(now, self._last_post.get(self._channel, float("-inf")) + self.min_interval)
            self._last_post[self._channel] = start
        if start > now:
            time.sleep(start - now)

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(
            self._url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": "corebus-alerts"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            answer = exc.read()[:1000]
            if exc.code == 429 or exc.code >= 500:
                raise RetryLater(f"HTTP {exc.code} {exc.reason}", _retry_after(exc.headers, answer)) from None
            self.dropped += 1
            log.error(
                "alert_webhook (%s): the receiver refused the alert with HTTP %d %s (%s); not retrying",
                self.format,
                exc.code,
                exc.reason,
                answer[:200].decode("utf-8", "replace"),
            )
            return
        except OSError as exc:  # refused, unreachable, timed out (URLError is an OSError)
            reason = str(getattr(exc, "reason", None) or exc or type(exc).__name__)
            # Messages of some errors quote the host; the URL itself (path = the secret) never.
            raise ConnectionError(f"{type(exc).__name__}: {reason}".replace(self._url, "***")) from None
        self.delivered += 1


def _retry_after(headers: Any, body: bytes) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP date) or a Discord-style
    JSON body ``{"retry_after": 1.5}``."""
    value = headers.get("Retry-After") if headers is not None else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    try:
        return max(0.0, float(json.loads(body)["retry_after"]))
    except (ValueError, KeyError, TypeError):
        return None


# -------------------------------------------------------------------- payloads


def truncate(text: str, limit: int) -> str:
    """Keep the head (what happened) and the tail (the innermost frames of a stack)."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit + 40
    head = limit * 2 // 5
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[head + cut :]}"


def _icon(alert: dict[str, Any]) -> str:
    return _ICONS["resolved" if alert.get("resolves") else alert["level"]]


def _where(alert: dict[str, Any]) -> str:
    parts = [alert.get("run") or "run"]
    if alert.get("step") is not None:
        parts.append(f"step {alert['step']}")
    if alert.get("epoch") is not None:
        parts.append(f"epoch {alert['epoch']}")
    parts.append(f"rank {alert.get('rank', 0)} on {alert.get('host', '?')}")
    return ", ".join(parts)


def payload(alert: dict[str, Any], format: str) -> dict[str, Any]:
    """The request body for one alert (``alert`` as :meth:`corebus.Alert.to_dict` gives it)."""
    title, text = alert["title"], alert.get("text") or ""
    if format == "slack":
        message = f"{_icon(alert)} *{title}*\n_{alert['level']} | {_where(alert)}_\n{text}"
        return {"text": truncate(message.rstrip(), LIMITS["slack"])}
    if format == "discord":
        message = f"{_icon(alert)} **{title}**\n*{alert['level']} | {_where(alert)}*\n{text}"
        return {"content": truncate(message.rstrip(), LIMITS["discord"])}
    if format == "teams":
        return _teams_card(alert, title, truncate(text, LIMITS["teams"]))
    body = dict(alert)
    body["details"] = truncate(body.get("details") or "", LIMITS["json"])
    return body


def _teams_card(alert: dict[str, Any], title: str, text: str) -> dict[str, Any]:
    color = _TEAMS_COLORS["resolved" if alert.get("resolves") else alert["level"]]
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": f"{_icon(alert)} {title}",
            "weight": "Bolder",
            "size": "Medium",
            "wrap": True,
            "color": color,
        },
        {
            "type": "FactSet",
            "facts": [
                {"title": "Level", "value": alert["level"]},
                {"title": "Run", "value": alert.get("run") or "run"},
                {"title": "Step", "value": str(alert.get("step"))},
                {"title": "Epoch", "value": str(alert.get("epoch"))},
                {"title": "Host", "value": f"{alert.get('host')} (rank {alert.get('rank', 0)})"},
            ],
        },
    ]
    # Adaptive Cards have no code blocks: fenced parts (stacks) become monospace blocks.
    for i, part in enumerate(text.split("```")):
        if part.strip():
            block = {"type": "TextBlock", "text": part.strip("\n"), "wrap": True}
            if i % 2:
                block.update(fontType="Monospace", size="Small")
            body.append(block)
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "msteams": {"width": "Full"},
        "body": body,
    }
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}
        ],
    }
