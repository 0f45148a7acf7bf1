"""The worker's consumer, kept alive through Redis going away (``worker_consumer`` in celeryconfig).

Celery reconnects a worker's consumer after a lost broker connection, but
kombu's Redis transport can fail while cleaning up the dead connection: with
messages in the worker's hands, closing the old channel tries to put them back
through a connection that no longer exists and raises (an ``AttributeError``
on a cleared transport, celery/kombu#970). The error escapes Celery's
reconnect path and ends the whole worker ("Unrecoverable error"), so a
standalone worker stopped at the first Redis crash that caught it busy.

The same dead channel ends the worker a second way: a job that was running
while the connection was lost finishes after the reconnect, and its
acknowledgement goes to the old channel, which raises the same error inside
the event loop.

`SelfHealingConsumer` finishes that cleanup whatever it raises and reconnects,
and settles (acknowledges or rejects) a message only on the live channel it
came from. Nothing is lost by skipping kombu's put-back or a late
acknowledgement: the messages stay in Redis's ``unacked`` hash under the
worker instance that held them, which stops heart-beating when the consumer
reconnects as a new instance, so the recovery reaper returns them to their
queues within GPT4P_WORKER_HEARTBEAT_TTL (`workers.recovery`); a job answered
twice that way is delivered once (deliveries are idempotent).

It also retries the connection forever, every 2 s at most (Celery gives up
after 100 tries, with waits growing to 30 s), so a worker notices a Redis that
is back within a second or two.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)

# Waits between connection attempts while Redis is away: 0.5 s, then 1 s, then every 2 s.
RECONNECT_START_S = 0.5
RECONNECT_STEP_S = 0.5
RECONNECT_MAX_S = 2.0


class SelfHealingConsumer(Consumer):
    """Celery's consumer, which survives the failures of kombu's cleanup after a lost connection."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Drop the lost connection (whatever its cleanup raises), then let Celery reconnect."""
        try:
            super().on_connection_error_after_connected(exc)
        except Exception as error:  # noqa: BLE001 - kombu#970 raises anything here
            log.warning(
                "cleaning up the lost Redis connection failed (%s: %s); reconnecting anyway: "
                "the jobs this worker held return to their queues through the recovery reaper",
                error.__class__.__name__, error,
            )  # fmt: skip
            self.connection = None

    def on_close(self) -> None:
        """Forget what the lost connection delivered; never fail the reconnect over it."""
        try:
            super().on_close()
        except Exception as error:  # noqa: BLE001 - same cleanup, same kombu bug
            log.warning("cleanup before reconnecting failed (%s); going on", error)

    def call_soon_ack(self, p: Any, *args: Any, **kwargs: Any) -> Any:
        """Acknowledge or reject a message later in the event loop, unless its channel is dead."""
        return super().call_soon_ack(_unless_stale(p), *args, **kwargs)

    def ensure_connected(self, conn: Any) -> Any:
        """Connect, retrying forever at short intervals (Celery's own would wait up to 30 s)."""
        retrying = functools.partial(
            conn.ensure_connection, interval_start=RECONNECT_START_S,
            interval_step=RECONNECT_STEP_S, interval_max=RECONNECT_MAX_S,
        )  # fmt: skip
        conn.ensure_connection = retrying
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the instance attribute; the class method again


def _unless_stale(settle: Any) -> Any:
    """`settle` (a message's ack or reject), skipped once the message's channel is closed."""
    message = getattr(settle, "__self__", None)

    @functools.wraps(settle)
    def settle_unless_stale(*args: Any, **kwargs: Any) -> Any:
        channel = getattr(message, "channel", None)
        if channel is not None and (channel.closed or getattr(channel, "_closing", False)):
            log.info("job received before Redis was lost not acknowledged on the dead "
                     "connection; the recovery reaper returns it to its queue")  # fmt: skip
            return None
        return settle(*args, **kwargs)

    return settle_unless_stale
