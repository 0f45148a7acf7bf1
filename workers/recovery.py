"""Getting a dead worker's jobs back to the queue in seconds, not after the visibility timeout.

With Redis, Celery's late acknowledgement leaves a job a worker holds in
Redis's ``unacked`` hash; if the whole worker dies, Redis gives it back only
when the visibility timeout (an hour here) has passed. So every worker
records, when it receives a job, which worker *instance* holds it, keeps a
heartbeat for that instance, and runs a reaper: a job held by an instance
whose heartbeat is older than GPT4P_WORKER_HEARTBEAT_TTL goes back to its
queue through kombu's own restore. A pool process killed inside a live worker
needs none of this: Celery requeues its job at once (reject on worker lost).

Trade-off: an instance that stops heart-beating without dying (a Redis blip
longer than the TTL) may see its running job restored and answered twice;
channel deliveries are idempotent per job, so nobody receives two answers.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any, cast

import redis
from celery import Celery

log = logging.getLogger(__name__)

OWNERS_KEY = "gpt4p:recovery:owners"  # delivery tag -> instance
NODES_KEY = "gpt4p:recovery:instances"  # sorted set: instance -> last heartbeat
UNACKED_KEY = "unacked"  # kombu's Redis transport defaults
UNACKED_INDEX_KEY = "unacked_index"


def instance_id(hostname: str) -> str:
    """A name for this run of a worker: a restart under the same hostname is a new instance."""
    return f"{hostname}#{uuid.uuid4().hex[:8]}"


def record_owner(client: redis.Redis, delivery_tag: str, instance: str) -> None:
    """Remember that `instance` holds the job with this delivery tag."""
    client.hset(OWNERS_KEY, delivery_tag, instance)


def _stuck(client: redis.Redis, tag: str, stuck_after: float, now: float) -> bool:
    """An inference job held past any time limit: its ack was lost (Redis went away)."""
    delivered = cast(float | None, client.zscore(UNACKED_INDEX_KEY, tag))
    if delivered is None or now - delivered < stuck_after:
        return False
    raw = cast(bytes | None, client.hget(UNACKED_KEY, tag))
    if raw is None:
        return False
    routing_key = json.loads(raw)[2]
    # Delivery tasks may legitimately wait out a retry countdown; inference jobs never do.
    return isinstance(routing_key, str) and routing_key.startswith("inference")


def reap_once(app: Celery, client: redis.Redis, ttl: float, stuck_after: float = 3600.0) -> int:
    """Return to their queues the jobs held by dead instances (or stuck); return how many.

    `stuck_after` (seconds, longer than the hard time limit) also returns an inference
    job its live worker can no longer acknowledge: Redis restarted while it ran.
    """
    now = time.time()
    alive = {
        m.decode() for m in cast(list[bytes], client.zrangebyscore(NODES_KEY, now - ttl, "+inf"))
    }
    owners = cast(dict[bytes, bytes], client.hgetall(OWNERS_KEY))
    if not owners:
        return 0
    unacked = {t.decode() for t in cast(list[bytes], client.hkeys(UNACKED_KEY))}
    restored = 0
    for raw_tag, raw_owner in owners.items():
        tag, owner = raw_tag.decode(), raw_owner.decode()
        if tag not in unacked:  # acknowledged (done) or already restored
            client.hdel(OWNERS_KEY, tag)
            continue
        if owner in alive and not _stuck(client, tag, stuck_after, now):
            continue
        with app.connection_for_write() as connection:
            connection.default_channel.qos.restore_by_tag(tag)
        client.hdel(OWNERS_KEY, tag)
        restored += 1
        log.warning("a job of dead worker %s (delivery %s) returned to its queue",
                    owner.split("#")[0], tag)  # fmt: skip
    client.zremrangebyscore(NODES_KEY, 0, now - 10 * ttl)
    return restored


class Recovery:
    """This worker instance's heartbeat and reaper, in one daemon thread."""

    def __init__(
        self, app: Celery, client: redis.Redis, instance: str, ttl: float, stuck_after: float
    ) -> None:
        self.app, self.client, self.instance, self.ttl = app, client, instance, ttl
        self.stuck_after = stuck_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recovery", daemon=True)

    def start(self) -> None:
        """Beat and reap now, then every third of the TTL."""
        self._beat()
        self._thread.start()

    def _beat(self) -> None:
        self.client.zadd(NODES_KEY, {self.instance: time.time()})

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._beat()
                reap_once(self.app, self.client, self.ttl, self.stuck_after)
            except Exception as error:  # noqa: BLE001 - this thread must outlive any failure
                # (kombu raises its own OperationalError while Redis is away)
                log.warning("recovery check failed (%s); retrying", error.__class__.__name__)

    def stop(self) -> None:
        """Stop; a clean stop removes this instance (its jobs were requeued by Celery)."""
        self._stop.set()
        try:
            self.client.zrem(NODES_KEY, self.instance)
        except redis.RedisError:
            log.warning("could not remove instance %s; it expires", self.instance)


def delivery_tag(request: Any) -> str | None:
    """The Redis delivery tag of a received task request, if any."""
    message = getattr(request, "message", None)
    tag = getattr(message, "delivery_tag", None)
    return str(tag) if tag else None
