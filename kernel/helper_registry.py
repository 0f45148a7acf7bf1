"""Which helpers exist and which are alive, kept in Redis.

A helper's description lives under ``gpt4p:helper:<name>``; each running
instance refreshes its hostname's score in ``gpt4p:helper:<name>:live`` (a
sorted set of last heartbeats). An instance is live while its last heartbeat
is younger than the TTL, so a killed helper drops out by itself; a clean stop
removes it at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import cast

import redis

from kernel.contract import helper_queue
from kernel.helper_contract import HelperSpec

log = logging.getLogger(__name__)

PREFIX = "gpt4p:helper:"
INDEX = "gpt4p:helpers"
DEFAULT_TTL_S = 15.0


@dataclass(frozen=True)
class HelperInfo:
    """A registered helper as the core and `gpt4people helpers` see it."""

    name: str
    description: str
    capabilities: tuple[str, ...]
    accepts: tuple[str, ...]
    version: str
    queue: str
    time_limit: float
    instances: tuple[str, ...]

    @property
    def live(self) -> bool:
        """Whether at least one instance sent a heartbeat within the TTL."""
        return bool(self.instances)


class HelperRegistry:
    """Registration, heartbeats and look-ups of helpers in Redis."""

    def __init__(self, client: redis.Redis, ttl: float = DEFAULT_TTL_S) -> None:
        self.redis = client
        self.ttl = ttl

    def register(self, helper: HelperSpec, hostname: str) -> None:
        """Publish `helper`'s description and mark `hostname` live."""
        description = {
            "name": helper.name,
            "description": helper.description,
            "capabilities": json.dumps(list(helper.capabilities)),
            "accepts": json.dumps(list(helper.accepts)),
            "version": helper.version,
            "queue": helper_queue(helper.name),
            "time_limit": str(helper.time_limit),
        }
        pipe = self.redis.pipeline()
        pipe.hset(PREFIX + helper.name, mapping=description)
        pipe.sadd(INDEX, helper.name)
        pipe.execute()
        self.heartbeat(helper.name, hostname)

    def heartbeat(self, name: str, hostname: str) -> None:
        """Say that `hostname` still runs helper `name`."""
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.zadd(f"{PREFIX}{name}:live", {hostname: now})
        pipe.zremrangebyscore(f"{PREFIX}{name}:live", 0, now - self.ttl)
        pipe.execute()

    def deregister(self, name: str, hostname: str) -> None:
        """Remove `hostname` from helper `name`'s live instances (a clean stop)."""
        self.redis.zrem(f"{PREFIX}{name}:live", hostname)

    def get(self, name: str) -> HelperInfo | None:
        """The helper called `name`, live or not; None when it never registered."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(PREFIX + name))
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        since = time.time() - self.ttl
        instances = cast(
            list[bytes], self.redis.zrangebyscore(f"{PREFIX}{name}:live", since, "+inf")
        )
        return HelperInfo(
            name=name,
            description=fields.get("description", ""),
            capabilities=tuple(json.loads(fields.get("capabilities", "[]"))),
            accepts=tuple(json.loads(fields.get("accepts", "[]"))),
            version=fields.get("version", ""),
            queue=fields.get("queue", helper_queue(name)),
            time_limit=float(fields.get("time_limit", "20")),
            instances=tuple(sorted(i.decode() for i in instances)),
        )

    def all(self) -> list[HelperInfo]:
        """Every registered helper, sorted by name."""
        names = sorted(n.decode() for n in cast(set[bytes], self.redis.smembers(INDEX)))
        return [info for name in names if (info := self.get(name)) is not None]

    def live(self) -> list[HelperInfo]:
        """The helpers with at least one live instance."""
        return [info for info in self.all() if info.live]


class Heartbeat:
    """A daemon thread that keeps one helper instance live until stopped."""

    def __init__(self, registry: HelperRegistry, name: str, hostname: str) -> None:
        self.registry = registry
        self.name = name
        self.hostname = hostname
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)

    def start(self) -> None:
        """Begin beating every third of the TTL."""
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.registry.ttl / 3):
            try:
                self.registry.heartbeat(self.name, self.hostname)
            except redis.RedisError as error:
                log.warning("helper heartbeat failed (%s); retrying", error.__class__.__name__)

    def stop(self) -> None:
        """Stop beating and deregister this instance."""
        self._stop.set()
        try:
            self.registry.deregister(self.name, self.hostname)
        except redis.RedisError:
            log.warning("could not deregister helper %s; it expires with its TTL", self.name)
