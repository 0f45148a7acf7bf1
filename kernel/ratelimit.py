"""A fixed-window rate limit per sender, counted in Redis so every process shares it.

Used by the channels (messages per number or address) and by the core (helper calls
per sender); it lives in the kernel because both import it.
"""

from __future__ import annotations

import time
from typing import Literal

import redis

RateVerdict = Literal["ok", "notify", "silent"]


class SenderRateLimit:
    """`limit` messages per `window` seconds per sender key; the first one over is "notify"."""

    def __init__(self, client: redis.Redis, prefix: str, limit: int, window: int) -> None:
        self.redis = client
        self.prefix = prefix
        self.limit = limit
        self.window = window

    def verdict(self, sender_key: str) -> RateVerdict:
        """Count one message from `sender_key` and say whether it may be answered."""
        key = f"{self.prefix}{sender_key}:{int(time.time()) // self.window}"
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, self.window + 60)
        count = int(pipe.execute()[0])
        if count <= self.limit:
            return "ok"
        return "notify" if count == self.limit + 1 else "silent"
