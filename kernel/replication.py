"""Acknowledging an accepted message only once a replica has it, so a failover loses none.

A channel acknowledges a message to its sender (the webhook's 200, the mail's
IMAP flag, a delivery's claim before the irreversible send) after
`ReplicaWait.wait`: when the primary has replicas, Redis ``WAIT`` blocks until
they have every write made so far, bounded by GPT4P_REDIS_WAIT_TIMEOUT. The
trade-off: a millisecond or two per accepted message with a replica on the
same network; past the timeout the message is accepted anyway, logged and
counted (``gpt4p_replication_wait_timeouts_total``): refused instead, an SMS
would be lost for sure (Twilio does not retry a webhook).

With Sentinels configured, a primary that has no replica online (the replica
is down, or a failover has just happened and the old primary has not rejoined)
cannot protect what it accepts: each message accepted so is counted
(``gpt4p_replication_unprotected_total``) and a warning logged once a minute,
so an operator sees the degraded state rather than trusting the guarantee.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, cast

import redis

from kernel.keys import REPLICATION_MARK_CHANNEL
from kernel.metrics import Metrics
from kernel.redis_urls import is_sentinel_url
from kernel.settings import Settings

log = logging.getLogger(__name__)

REPLICA_COUNT_TTL_S = 5.0
UNPROTECTED_WARNING_EVERY_S = 60.0
_SHARED: weakref.WeakKeyDictionary[redis.Redis, ReplicaWait] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def make_durable(client: redis.Redis, settings: Settings) -> bool:
    """Wait until replicas have every write so far (see `ReplicaWait.wait`)."""
    return ReplicaWait.shared(client, settings).wait()


class ReplicaWait:
    """Waits until replicas have every write made so far, when the primary has replicas.

    Redis ``WAIT`` covers the writes of the connection it runs on; a channel's
    writes come from several connections (its own pool, Celery's). So the
    connection that waits first sends a ``PUBLISH`` (replicated like a write,
    but not written to the append-only file, so it costs no fsync): replication
    is one ordered stream, so once a replica has it, it has every write that
    finished before it. Without replicas (one Redis) nothing is waited for: the
    replica count is read at most every few seconds.
    """

    def __init__(
        self, client: redis.Redis, replicas: int, timeout: float, expect_replicas: bool = False
    ) -> None:
        # Weak: the process-wide table of waiters must not keep a closed client alive.
        self._client = weakref.ref(client)
        self.replicas, self.timeout = replicas, timeout
        self.expect_replicas = expect_replicas  # Sentinels watch this Redis: a replica is due
        self._lock = threading.Lock()
        self._known: tuple[float, int] = (0.0, 0)
        self._warned_at = -UNPROTECTED_WARNING_EVERY_S
        self.timeouts = 0  # waits that ended before enough replicas had the data
        self.unprotected = 0  # waits with no replica online although one was expected

    @classmethod
    def shared(cls, client: redis.Redis, settings: Settings) -> ReplicaWait:
        """This process's waiter for `client` (GPT4P_REDIS_WAIT_REPLICAS and _TIMEOUT), whose
        replica count is shared by every caller."""
        with _SHARED_LOCK:
            waiter = _SHARED.get(client)
            if waiter is None:
                waiter = _SHARED[client] = cls(
                    client, settings.redis_wait_replicas, settings.redis_wait_timeout,
                    expect_replicas=is_sentinel_url(settings.redis_url or ""),
                )  # fmt: skip
            return waiter

    @property
    def client(self) -> redis.Redis:
        """The client this waiter waits through."""
        client = self._client()
        if client is None:
            raise RuntimeError("the Redis client of this ReplicaWait was closed and collected")
        return client

    def _connected_replicas(self) -> int:
        with self._lock:
            checked, count = self._known
            if time.monotonic() - checked < REPLICA_COUNT_TTL_S:
                return count
        info = cast(dict[str, Any], self.client.info("replication"))
        count = sum(1 for key, value in info.items()
                    if key.startswith("slave") and isinstance(value, dict)
                    and value.get("state") == "online")  # fmt: skip
        with self._lock:
            self._known = (time.monotonic(), count)
        return count

    def wait(self) -> bool:
        """Block until enough replicas have every write so far, or the timeout; return
        whether they do (True when none is expected: one Redis). Raises Redis errors."""
        if self.replicas == 0:
            return True
        wanted = min(self.replicas, self._connected_replicas())
        if wanted == 0:
            if self.expect_replicas:
                self._accepted_unprotected()
            return not self.expect_replicas
        pipe = self.client.pipeline(transaction=False)  # one connection for both commands
        pipe.publish(REPLICATION_MARK_CHANNEL, "1")
        pipe.execute_command("WAIT", wanted, max(1, int(self.timeout * 1000)))
        acknowledged = int(pipe.execute()[1])
        if acknowledged >= wanted:
            return True
        with self._lock:  # a replica may have gone (a failover): count them again next time
            self._known = (0.0, 0)
            self.timeouts += 1
        Metrics(self.client).count("gpt4p_replication_wait_timeouts", {})
        log.warning("only %d of %d replica(s) confirmed within %gs (GPT4P_REDIS_WAIT_TIMEOUT); "
                    "accepting anyway", acknowledged, wanted, self.timeout)  # fmt: skip
        return False

    def _accepted_unprotected(self) -> None:
        with self._lock:
            self.unprotected += 1
            now = time.monotonic()
            warn = now - self._warned_at >= UNPROTECTED_WARNING_EVERY_S
            if warn:
                self._warned_at = now
        Metrics(self.client).count("gpt4p_replication_unprotected", {})
        if warn:
            log.warning("the Redis primary has no replica online: messages accepted now are "
                        "lost if it fails before a replica catches up "
                        "(gpt4p_replication_unprotected_total counts them)")  # fmt: skip
