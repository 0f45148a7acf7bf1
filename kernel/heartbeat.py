"""Who is alive, kept in Redis: a sorted set of last heartbeats, and a thread that beats.

Inference workers (for /readyz), worker instances (for the dead-worker reaper)
and helper instances each refresh their name's score in a sorted set every
third of a TTL. A member is alive while its last heartbeat is younger than the
TTL, so a killed process drops out by itself and a clean stop removes it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import cast

import redis


class LiveSet:
    """The members of one sorted set that beat within `ttl` seconds.

    A beat also forgets members silent for `forget_after` seconds (the TTL
    unless longer): they are dead either way, and the set stays small.
    """

    def __init__(
        self, client: redis.Redis, key: str, ttl: float, forget_after: float | None = None
    ) -> None:
        self.client, self.key, self.ttl = client, key, ttl
        self.forget_after = ttl if forget_after is None else forget_after

    def beat(self, member: str) -> None:
        """Record that `member` is alive now."""
        now = time.time()
        pipe = self.client.pipeline()
        pipe.zadd(self.key, {member: now})
        pipe.zremrangebyscore(self.key, 0, now - self.forget_after)
        pipe.execute()

    def oldest_alive(self) -> float:
        """The time before which a last heartbeat means dead."""
        return time.time() - self.ttl

    def alive(self) -> list[str]:
        """The members alive now, sorted."""
        names = cast(list[bytes], self.client.zrangebyscore(self.key, self.oldest_alive(), "+inf"))
        return sorted(n.decode() for n in names)

    def remove(self, member: str) -> None:
        """Forget `member` at once (it stopped cleanly)."""
        self.client.zrem(self.key, member)


class HeartbeatThread:
    """Keeps `member` alive in a `LiveSet` from a daemon thread until stopped.

    It beats every third of the TTL, then runs `also` (further periodic work).
    No failure ends the thread: while Redis is away it logs `failed` (with the
    error's class as ``{error}``) to `log` and tries again. A clean stop
    removes the member, or logs `not_removed` (``{member}``) if Redis is away.
    """

    def __init__(
        self,
        live: LiveSet,
        member: str,
        *,
        name: str,
        log: logging.Logger,
        failed: str,
        not_removed: str,
        also: Callable[[], object] | None = None,
    ) -> None:
        self.live, self.member = live, member
        self._log, self._failed, self._not_removed, self._also = log, failed, not_removed, also
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Beat now (Redis errors raise), then every third of the TTL."""
        self.live.beat(self.member)
        self._thread.start()

    def rename(self, member: str) -> None:
        """Beat as `member` from now on; the old name is left to expire."""
        self.member = member
        self.live.beat(member)

    def _run(self) -> None:
        while not self._stop.wait(self.live.ttl / 3):
            try:
                self.live.beat(self.member)
                if self._also is not None:
                    self._also()
            except Exception as error:  # noqa: BLE001 - this thread must outlive any failure
                # (kombu raises its own OperationalError while Redis is away)
                self._log.warning(self._failed.format(error=error.__class__.__name__))

    def stop(self) -> None:
        """Stop beating and remove the member at once."""
        self._stop.set()
        try:
            self.live.remove(self.member)
        except redis.RedisError:
            self._log.warning(self._not_removed.format(member=self.member))
