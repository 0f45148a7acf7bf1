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
import time
import uuid
from typing import Any, cast

import redis
from celery import Celery

from kernel.heartbeat import HeartbeatThread, LiveSet
from kernel.keys import RECOVERY_INSTANCES_KEY, RECOVERY_OWNERS_KEY, UNACKED_INDEX_KEY, UNACKED_KEY
from workers import ledger

log = logging.getLogger(__name__)

# A dead instance stays listed this many TTLs (not alive), so `status --job` can still
# say how long ago the holder of a job last beat.
FORGET_AFTER_TTLS = 10


def instance_id(hostname: str) -> str:
    """A name for this run of a worker: a restart under the same hostname is a new instance."""
    return f"{hostname}#{uuid.uuid4().hex[:8]}"


def record_owner(client: redis.Redis, delivery_tag: str, instance: str) -> None:
    """Remember that `instance` holds the job with this delivery tag."""
    client.hset(RECOVERY_OWNERS_KEY, delivery_tag, instance)


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
    alive = set(_instances(client, ttl).alive())
    owners = cast(dict[bytes, bytes], client.hgetall(RECOVERY_OWNERS_KEY))
    unacked = {t.decode() for t in cast(list[bytes], client.hkeys(UNACKED_KEY))}
    restored = _restore_orphans(app, client, unacked - {t.decode() for t in owners}, now - ttl)
    for raw_tag, raw_owner in owners.items():
        tag, owner = raw_tag.decode(), raw_owner.decode()
        if tag not in unacked:  # acknowledged (done) or already restored
            client.hdel(RECOVERY_OWNERS_KEY, tag)
            continue
        if owner in alive and not _stuck(client, tag, stuck_after, now):
            continue
        with app.connection_for_write() as connection:
            connection.default_channel.qos.restore_by_tag(tag)
        client.hdel(RECOVERY_OWNERS_KEY, tag)
        restored += 1
        # The holder died, or reconnected as a new instance (its old jobs could not be acked).
        log.warning("a job held by %s, which stopped heart-beating, returned to its queue "
                    "(delivery %s)", owner.split("#")[0], tag)  # fmt: skip
    return restored


def _instances(client: redis.Redis, ttl: float) -> LiveSet:
    """The worker instances and their heartbeats."""
    return LiveSet(client, RECOVERY_INSTANCES_KEY, ttl, forget_after=FORGET_AFTER_TTLS * ttl)


def _restore_orphans(app: Celery, client: redis.Redis, tags: set[str], before: float) -> int:
    """Return to their queues the unacked jobs that no worker ever said it received.

    A worker records itself as the holder within milliseconds of taking a job;
    a job unacked for longer with no holder was taken in the instant Redis
    crashed (after kombu's unacked record, before the worker saw it), or by a
    worker that died in that instant. Nobody will run it: without this it
    would wait for the visibility timeout.
    """
    restored = 0
    for tag in sorted(tags):
        delivered = cast(float | None, client.zscore(UNACKED_INDEX_KEY, tag))
        if delivered is None or delivered > before:
            continue
        with app.connection_for_write() as connection:
            connection.default_channel.qos.restore_by_tag(tag)
        restored += 1
        log.warning("a job no worker took up (delivery %s) returned to its queue", tag)
    return restored


class Recovery:
    """This worker instance's heartbeat and reaper, in one daemon thread."""

    def __init__(
        self, app: Celery, client: redis.Redis, instance: str, ttl: float, stuck_after: float
    ) -> None:
        self.app, self.client, self.ttl = app, client, ttl
        self.stuck_after = stuck_after
        self._heartbeat = HeartbeatThread(
            _instances(client, ttl), instance, name="recovery", log=log, also=self._recover,
            failed="recovery check failed ({error}); retrying",
            not_removed="could not remove instance {member}; it expires",
        )  # fmt: skip

    @property
    def instance(self) -> str:
        """This run of the worker, as its heartbeat and job records name it."""
        return self._heartbeat.member

    def start(self) -> None:
        """Beat now, then beat and reap every third of the TTL."""
        self._heartbeat.start()

    def renew(self) -> None:
        """Become a new instance: the consumer reconnected to Redis after losing it.

        Celery forgets the jobs it had received on the lost connection, and could
        not acknowledge them anyway: they sit in Redis's unacked hash under the old
        instance, which stops heart-beating, so within the TTL they are returned to
        their queues. One still running here is then run twice: answered once.
        """
        old = self.instance
        self._heartbeat.rename(instance_id(old.split("#")[0]))
        log.info("reconnected to Redis: jobs held before go back to their queues within %gs",
                 self.ttl)  # fmt: skip
        log.debug("instance %s replaced by %s", old, self.instance)

    def _recover(self) -> None:
        reap_once(self.app, self.client, self.ttl, self.stuck_after)
        # Jobs lost from Redis altogether (popped in the instant of a crash).
        ledger.sweep(self.app, self.client, grace=2 * self.ttl, recheck=self.ttl / 2,
                     owner=self.instance)  # fmt: skip

    def stop(self) -> None:
        """Stop; a clean stop removes this instance (its jobs were requeued by Celery)."""
        self._heartbeat.stop()


def delivery_tag(request: Any) -> str | None:
    """The Redis delivery tag of a received task request, if any."""
    message = getattr(request, "message", None)
    tag = getattr(message, "delivery_tag", None)
    return str(tag) if tag else None
