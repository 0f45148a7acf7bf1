"""Which inference workers are alive, for /readyz and `status`: heartbeats in Redis.

Each inference worker keeps its hostname alive in one `LiveSet` (and says
which model it serves); a worker is alive while its last heartbeat is younger
than GPT4P_WORKER_HEARTBEAT_TTL, so a killed worker drops out by itself and a
clean stop removes it at once.
"""

from __future__ import annotations

import logging
from typing import cast

import redis

from kernel.heartbeat import HeartbeatThread, LiveSet
from kernel.keys import INFERENCE_LIVE_KEY, INFERENCE_MODELS_KEY
from kernel.settings import get_settings

log = logging.getLogger(__name__)


def _live(client: redis.Redis) -> LiveSet:
    return LiveSet(client, INFERENCE_LIVE_KEY, get_settings().worker_heartbeat_ttl)


def served_models(client: redis.Redis) -> list[str]:
    """The models that live inference workers serve."""
    live = _live(client)
    pipe = client.pipeline(transaction=False)  # one round trip: every job asks this
    pipe.zrangebyscore(live.key, live.oldest_alive(), "+inf")
    pipe.hgetall(INFERENCE_MODELS_KEY)
    names, models = cast(tuple[list[bytes], dict[bytes, bytes]], pipe.execute())
    alive = {n.decode() for n in names}
    return sorted({m.decode() for h, m in models.items() if h.decode() in alive})


def live_workers(client: redis.Redis) -> list[str]:
    """Hostnames of the inference workers alive within the TTL."""
    return _live(client).alive()


class WorkerHeartbeat:
    """A daemon thread beating for one worker until stopped."""

    def __init__(self, client: redis.Redis, hostname: str, model: str) -> None:
        self.client = client
        self.hostname = hostname
        self.model = model
        self._heartbeat = HeartbeatThread(
            _live(client), hostname, name="liveness", log=log,
            failed="liveness heartbeat failed ({error})",
            not_removed="could not remove {member} from the live workers; it expires",
        )  # fmt: skip

    def start(self) -> None:
        """Beat now and every third of the TTL."""
        self.client.hset(INFERENCE_MODELS_KEY, self.hostname, self.model)
        self._heartbeat.start()

    def stop(self) -> None:
        """Stop beating and remove this worker at once."""
        self._heartbeat.stop()
