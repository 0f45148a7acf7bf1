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

`SelfHealingConsumer` closes the lost connection whatever that raises and reconnects,
and settles (acknowledges or rejects) a message only on the live channel it
came from. Nothing is lost by skipping kombu's put-back or a late
acknowledgement: the messages stay in Redis's ``unacked`` hash under the
worker instance that held them, which stops heart-beating when the consumer
reconnects as a new instance, so the recovery reaper returns them to their
queues within GPT4P_WORKER_HEARTBEAT_TTL (`workers.recovery`); a job answered
twice that way is delivered once (deliveries are idempotent).

It also retries the connection every 2 s at most (Celery's waits grow to
30 s), so a worker notices a Redis that is back within a second or two; with
``broker_connection_max_retries = None`` (celeryconfig) it never gives up.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

from celery.exceptions import CPendingDeprecationWarning
from celery.worker.consumer import Consumer

from kernel.settings import get_settings
from workers.lane import lane_slots

log = logging.getLogger(__name__)

# Celery warns at every reconnect that it will cancel running jobs by default one day; the
# choice is made explicitly in celeryconfig (worker_cancel_long_running_tasks_on_connection_loss).
warnings.filterwarnings(
    "ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss",
    category=CPendingDeprecationWarning,
)  # fmt: skip

# Waits between connection attempts while Redis is away: 0.5 s, then 1 s, then every 2 s.
RECONNECT_START_S = 0.5
RECONNECT_STEP_S = 0.5
RECONNECT_MAX_S = 2.0


class SelfHealingConsumer(Consumer):
    """Celery's consumer, which survives the failures of kombu's cleanup after a lost connection.

    On a batched inference worker it also leaves GPT4P_PRIORITY_SLOTS of the pool's threads
    to the fast lane's own consumer (`workers.lane`): it takes at most that many fewer jobs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lane_slots = lane_slots(get_settings())
        initial = int(getattr(self, "initial_prefetch_count", 0))
        if initial:  # 0 would mean no limit at all: left as it is
            self.initial_prefetch_count = max(1, initial - self.lane_slots)

    @property
    def max_prefetch_count(self) -> int:
        """Celery's (threads x multiplier), less the threads kept for the fast lane."""
        return max(1, int(super().max_prefetch_count) - self.lane_slots)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Celery's handling of a lost connection, with a close of it that cannot raise."""
        if self.connection is not None:
            # Celery closes the lost connection with ignore_errors(), which lets kombu#970's
            # AttributeError through; everything else it does here (prefetch, events) stays.
            self.connection.close = _closing_whatever_it_raises(self.connection.close)
        super().on_connection_error_after_connected(exc)

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


def _closing_whatever_it_raises(close: Any) -> Any:
    """`close` (of a lost connection), logging instead of raising what kombu's cleanup raises."""

    @functools.wraps(close)
    def close_lost_connection() -> None:
        try:
            close()
        except Exception as error:
            log.warning(
                "cleaning up the lost Redis connection failed (%s: %s); reconnecting anyway: "
                "the jobs this worker held return to their queues through the recovery reaper",
                error.__class__.__name__, error,
            )  # fmt: skip
            log.debug("the cleanup's traceback", exc_info=error)

    return close_lost_connection


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
