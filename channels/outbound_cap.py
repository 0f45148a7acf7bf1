"""A global cap on what each channel sends per hour, whoever asked.

Per-sender limits stop one sender; a spam run from many senders (rotating
From addresses, many numbers) is bounded only by a cap on everything a
channel sends. It is counted in Redis per clock hour (UTC), so every delivery
process on every host shares one count, and taken in the delivery path after
the reply is claimed, right before the send that cannot be undone. A send
that failed gives its slot back.

A reply that finds the cap reached is held, not lost: its delivery task is
retried when the next hour opens (`hold_delay`), until the reply would be
older than GPT4P_OUTBOUND_HOLD_MAX_AGE; then it is dropped and counted
(``gpt4p_delivery_failures{reason="capped"}``): `channels.delivery.hold`.
Every refusal counts in ``gpt4p_outbound_capped_total{channel}``, and the
first of each hour logs one warning that names nobody.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from kernel.metrics import Metrics

log = logging.getLogger(__name__)

PREFIX = "gpt4p:outbound:"
WINDOW_S = 3600
# A held task waits in its worker's memory, unacknowledged; Redis hands it to another
# worker after the visibility timeout (an hour at least): it wakes up well before that.
MAX_HOLD_STEP_S = 3000.0
HOLD_SPREAD_S = 60.0  # held replies are tried over the hour's first minute, not at once

# Take ARGV[1] slots of the hour's count if they all fit under the cap ARGV[2]. Returns
# 1 when taken, 0 when refused, -1 when refused for the first time this hour.
_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted, cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if used + wanted <= cap then
  redis.call('INCRBY', KEYS[1], wanted)
  redis.call('EXPIRE', KEYS[1], ttl)
  return 1
end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ttl) then return -1 end
return 0
"""


class OutboundCappedError(RuntimeError):
    """This hour's cap of the channel is reached; the reply may go out in `retry_in` s."""

    def __init__(self, channel: str, retry_in: float) -> None:
        super().__init__(f"the outbound {channel} cap of this hour is reached")
        self.retry_in = retry_in


@dataclass
class Reservation:
    """Slots taken from one hour's count; those no send used are given back."""

    client: redis.Redis
    key: str
    unused: int

    def use(self) -> None:
        """A send went out (or may have: no answer came), so its slot stays taken."""
        self.unused = max(0, self.unused - 1)

    def give_back(self) -> None:
        """Return the slots no send used (the send failed, or was found already done)."""
        if self.unused <= 0:
            return
        pipe = self.client.pipeline()
        pipe.decrby(self.key, self.unused)
        pipe.expire(self.key, 2 * WINDOW_S)
        try:
            pipe.execute()
        except redis.RedisError as error:
            # Kept taken: the cap errs on the side of sending less this hour.
            log.warning("outbound slots not given back (%s)", error.__class__.__name__)
        self.unused = 0


def hold_delay(now: float) -> float:
    """Seconds until a held reply is tried again: early in the next hour, at most one step."""
    to_next_hour = WINDOW_S - now % WINDOW_S
    spread = random.uniform(0, HOLD_SPREAD_S)  # noqa: S311 - spreading load, not security
    return min(to_next_hour + spread, MAX_HOLD_STEP_S)


class OutboundCap:
    """At most `per_hour` messages sent through `channel` per clock hour (0: no cap)."""

    def __init__(self, client: redis.Redis, channel: str, per_hour: int) -> None:
        self.redis = client
        self.channel = channel
        self.per_hour = per_hour
        self._take = client.register_script(_TAKE)

    def take(self, count: int = 1) -> Reservation:
        """Reserve `count` sends of this hour, all or none; raise `OutboundCappedError`."""
        now = time.time()
        window = int(now) // WINDOW_S
        key = f"{PREFIX}{self.channel}:{window}"
        if self.per_hour <= 0:
            return Reservation(self.redis, key, 0)
        # A reply longer than the whole cap goes out alone in an hour rather than never.
        wanted = min(count, self.per_hour)
        args = [wanted, self.per_hour, 2 * WINDOW_S]
        taken = int(self._take(keys=[key, f"{key}:warned"], args=args))
        if taken == 1:
            return Reservation(self.redis, key, wanted)
        self._refused(first=taken == -1, window=window)
        raise OutboundCappedError(self.channel, hold_delay(now))

    def _refused(self, first: bool, window: int) -> None:
        Metrics(self.redis).count("gpt4p_outbound_capped", {"channel": self.channel})
        if first:
            opens = datetime.fromtimestamp((window + 1) * WINDOW_S, UTC).strftime("%H:%M")
            log.warning(
                "outbound %s cap of %d per hour (GPT4P_%s_MAX_PER_HOUR) reached: replies "
                "are held until %s UTC", self.channel, self.per_hour, self.channel.upper(), opens,
            )  # fmt: skip
