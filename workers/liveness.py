"""Which inference workers are alive, for /readyz and `status`: heartbeats in Redis.

Each inference worker refreshes its hostname's score in one sorted set; a
worker is alive while its last heartbeat is younger than the TTL, so a killed
worker drops out by itself and a clean stop removes it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import cast

import redis

log = logging.getLogger(__name__)

LIVE_KEY = "gpt4p:inference:live"
MODELS_KEY = "gpt4p:inference:models"
TTL_S = 15.0


def beat(client: redis.Redis, hostname: str) -> None:
    """Record that `hostname` is alive now."""
    now = time.time()
    pipe = client.pipeline()
    pipe.zadd(LIVE_KEY, {hostname: now})
    pipe.zremrangebyscore(LIVE_KEY, 0, now - TTL_S)
    pipe.execute()


def served_models(client: redis.Redis) -> list[str]:
    """The models that live inference workers serve."""
    pipe = client.pipeline(transaction=False)  # one round trip: every job asks this
    pipe.zrangebyscore(LIVE_KEY, time.time() - TTL_S, "+inf")
    pipe.hgetall(MODELS_KEY)
    names, models = cast(tuple[list[bytes], dict[bytes, bytes]], pipe.execute())
    live = {n.decode() for n in names}
    return sorted({m.decode() for h, m in models.items() if h.decode() in live})


def live_workers(client: redis.Redis) -> list[str]:
    """Hostnames of the inference workers alive within the TTL."""
    names = cast(list[bytes], client.zrangebyscore(LIVE_KEY, time.time() - TTL_S, "+inf"))
    return sorted(n.decode() for n in names)


class WorkerHeartbeat:
    """A daemon thread beating for one worker until stopped."""

    def __init__(self, client: redis.Redis, hostname: str, model: str) -> None:
        self.client = client
        self.hostname = hostname
        self.model = model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> None:
        """Beat now and every third of the TTL."""
        self.client.hset(MODELS_KEY, self.hostname, self.model)
        beat(self.client, self.hostname)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TTL_S / 3):
            try:
                beat(self.client, self.hostname)
            except redis.RedisError as error:
                log.warning("liveness heartbeat failed (%s)", error.__class__.__name__)

    def stop(self) -> None:
        """Stop beating and remove this worker at once."""
        self._stop.set()
        try:
            self.client.zrem(LIVE_KEY, self.hostname)
        except redis.RedisError:
            log.warning("could not remove %s from the live workers; it expires", self.hostname)
