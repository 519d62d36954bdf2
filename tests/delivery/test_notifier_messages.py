"""What a notifier says when alerts could not be delivered: one true thing."""

import logging

from corebus import Alert
from corebus.plugins.alert_webhook import AlertWebhook

from webhook_receiver import Receiver


def test_undelivered_alerts_of_a_notifier_without_spool_are_called_lost_not_replayable(caplog):
    with Receiver(answers=[503] * 50) as receiver:  # keeps answering "retry later"
        notifier = AlertWebhook(url=receiver.url, min_interval=0, max_backoff=0.2, shutdown_timeout=0.5)
        notifier.on_train_begin()
        notifier.on_alert(alert=Alert(kind="stall", title="Training stalled", step=3))
        with caplog.at_level(logging.WARNING, logger="corebus"):
            assert notifier.close() is False
    (message,) = [r.getMessage() for r in caplog.records if "could not be delivered" in r.getMessage()]
    assert "1 records could not be delivered" in message and "are lost" in message
    # Nothing was spooled, so nothing can be replayed: the message must not suggest it.
    assert "corebus sync" not in message and "replay" not in message and "spooled in" not in message
