"""Fair share: one sender (a phone number, an address, an API key) cannot occupy every slot.

Each sender's jobs in flight are a sorted set in Redis (job id -> when it was submitted),
keyed by a digest of the channel and sender, never the sender in clear. A job submitted
while its sender already has GPT4P_SENDER_SLOTS jobs in flight is demoted to bulk: it is
still answered, after everyone else's interactive and normal jobs. A job leaves the set
when its task ends (`release`); one whose worker died leaves it by age, once it is older
than any job can run (the hard time limit plus the reaper's margin), so a crash never
leaves a sender demoted for good.
"""

from __future__ import annotations

import hashlib
import time
from typing import cast

import redis
from redis.client import Pipeline

from kernel.contract import Job
from kernel.keys import INFLIGHT_PREFIX


def inflight_key(job: Job) -> str:
    """The sorted set of the jobs in flight of `job`'s sender (a digest, not the sender)."""
    digest = hashlib.sha256(f"{job.channel}\0{job.user}".encode()).hexdigest()[:24]
    return INFLIGHT_PREFIX + digest


def claim(pipe: Pipeline, job: Job, max_age: float) -> int:
    """Queue on `pipe`: count `job` in flight for its sender, not counting jobs over
    `max_age` seconds old. Return the index, among `pipe`'s results, of how many others of
    the sender's were in flight before (`within` reads it)."""
    key, now = inflight_key(job), time.time()
    pipe.zremrangebyscore(key, "-inf", now - max_age)
    pipe.zcard(key)
    at = len(pipe) - 1
    pipe.zadd(key, {job.id: now})
    pipe.expire(key, int(max_age) + 1)
    return at


def within(others: object, cap: int) -> bool:
    """Whether a job whose sender had `others` jobs in flight is within a share of `cap`."""
    if isinstance(others, Exception):  # as a pipeline returned it: an error raises
        raise others
    return int(cast(int, others)) < cap


def release(client: redis.Redis | Pipeline, job: Job) -> None:
    """`job` is no longer in flight (answered, failed, or handed to a helper)."""
    client.zrem(inflight_key(job), job.id)
