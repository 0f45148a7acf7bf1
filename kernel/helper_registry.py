"""Which helpers exist and which are alive, kept in Redis.

A helper's description lives under ``gpt4p:helper:<name>`` (`kernel.keys`);
each running instance keeps its hostname alive in ``gpt4p:helper:<name>:live``
(a `LiveSet`). An instance is live while its last heartbeat is younger than the
TTL, so a killed helper drops out by itself; a clean stop removes it at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import cast

import redis

from kernel.contract import helper_queue
from kernel.heartbeat import HeartbeatThread, LiveSet
from kernel.helper_contract import HelperSpec
from kernel.keys import HELPERS_INDEX_KEY, helper_key, helper_live_key

log = logging.getLogger(__name__)

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
        pipe.hset(helper_key(helper.name), mapping=description)
        pipe.sadd(HELPERS_INDEX_KEY, helper.name)
        pipe.execute()
        self.heartbeat(helper.name, hostname)

    def instances(self, name: str) -> LiveSet:
        """Helper `name`'s instances and their heartbeats."""
        return LiveSet(self.redis, helper_live_key(name), self.ttl)

    def heartbeat(self, name: str, hostname: str) -> None:
        """Say that `hostname` still runs helper `name`."""
        self.instances(name).beat(hostname)

    def get(self, name: str) -> HelperInfo | None:
        """The helper called `name`, live or not; None when it never registered."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(helper_key(name)))
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return HelperInfo(
            name=name,
            description=fields.get("description", ""),
            capabilities=tuple(json.loads(fields.get("capabilities", "[]"))),
            accepts=tuple(json.loads(fields.get("accepts", "[]"))),
            version=fields.get("version", ""),
            queue=fields.get("queue", helper_queue(name)),
            time_limit=float(fields.get("time_limit", "20")),
            instances=tuple(self.instances(name).alive()),
        )

    def all(self) -> list[HelperInfo]:
        """Every registered helper, sorted by name."""
        names = sorted(n.decode() for n in cast(set[bytes], self.redis.smembers(HELPERS_INDEX_KEY)))
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
        self._heartbeat = HeartbeatThread(
            registry.instances(name), hostname, name=f"heartbeat-{name}", log=log,
            failed="helper heartbeat failed ({error}); retrying",
            not_removed=f"could not deregister helper {name}; it expires with its TTL",
        )  # fmt: skip

    def start(self) -> None:
        """Beat now and every third of the TTL."""
        self._heartbeat.start()

    def stop(self) -> None:
        """Stop beating and deregister this instance."""
        self._heartbeat.stop()
