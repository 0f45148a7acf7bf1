"""What every channel that answers later does to deliver a reply, written once.

A channel's delivery task builds a `Delivery` and runs it. The channel's
`send` claims the reply in Redis, sends it and records the send, so that a
retried task sends nothing twice; it classifies a failed send as transient
(`TransientDeliveryError`: retried with backoff, abandoned after the channel's
retries) or permanent (`PermanentDeliveryError`: refused, never retried),
having settled its own claims first. This module does the rest, the same for
every channel: the retries and their backoff, the hold of a reply past the
hourly cap (`channels.outbound_cap`), the log lines, and the delivery metrics
(``gpt4p_deliveries_total{channel}``,
``gpt4p_delivery_failures_total{channel,reason}``). Logs name the recipient
only by the channel's pseudonym, never by address.
"""

from __future__ import annotations

import contextlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, ClassVar

import redis
from celery import Task
from celery.exceptions import Retry

from channels.outbound_cap import OutboundCap, OutboundCappedError
from kernel.contract import Reply
from kernel.logs import bind_job
from kernel.metrics import Metrics
from kernel.settings import Settings, get_settings
from workers.app import broker_redis

log = logging.getLogger(__name__)

DELIVERED = "delivered"


class TransientDeliveryError(RuntimeError):
    """The channel did not take the message now (rate limited, server error, no answer):
    send it again later."""


class PermanentDeliveryError(RuntimeError):
    """The channel will never take this message (invalid or unsubscribed recipient, ...);
    `code` is the provider's reason, where it gives one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeliveryPolicy:
    """A channel's limits: how often and how fast it retries, and its hourly cap."""

    max_retries: int
    backoff_s: float  # the first retry's delay, doubled at each retry ...
    backoff_ceiling_s: float  # ... up to this
    per_hour: int  # sends per clock hour, all replies together (0: no cap)

    def retry_in(self, retries: int) -> float:
        """Seconds before the next try, after `retries` retries."""
        delay = min(self.backoff_s * 2**retries, self.backoff_ceiling_s)
        # Jitter: replies that failed together are not all tried again together.
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security


@dataclass(frozen=True)
class Outcome:
    """What a channel's `send` did: a status, what the task's result adds to it, and for a
    delivered reply a few words the log line adds (" in 2 part(s)")."""

    status: str
    details: dict[str, Any] = field(default_factory=dict)
    how: str = ""

    def result(self) -> dict[str, Any]:
        """The delivery task's result (stored in Redis: no address, no text)."""
        return {**self.details, "status": self.status}


@contextlib.contextmanager
def freed_if_unsent(release_claim: Callable[[], object]) -> Iterator[None]:
    """Free a send's claim when the step inside fails before anything went out (Redis
    unavailable, the hourly cap reached), so that the retry sends at once instead of
    waiting for the claim to go stale; the failure is raised."""
    try:
        yield
    except (OutboundCappedError, redis.RedisError):
        with contextlib.suppress(redis.RedisError):
            release_claim()
        raise


def send_each_once(
    count: int,
    claim: Callable[[int], bool],
    send: Callable[[int], None],
    release: Callable[[int], None],
    cap: OutboundCap | None,
    maybe_sent: type[Exception],
) -> int:
    """Send parts 0..`count`-1 of a reply, each at most once; return how many were sent now.

    `claim(i)` claims part i in Redis (False: it went out already, or may have), `send(i)`
    sends a claimed part and records it, `release(i)` frees a claim nothing was sent for.
    The parts still to send are taken from `cap` together, before the first of them goes
    out: the hourly cap holds a reply whole, never cuts it in two. A send that failed with
    `maybe_sent` may have gone out: it counts against the cap.
    """
    sent, reservation = 0, None
    try:
        for index in range(count):
            if not claim(index):
                continue
            if reservation is None and cap is not None:
                with freed_if_unsent(partial(release, index)):
                    reservation = cap.take(count - index)
            try:
                send(index)
            except maybe_sent:
                if reservation is not None:
                    reservation.use()  # it may have gone out: it counts
                raise
            if reservation is not None:
                reservation.use()
            sent += 1
    finally:
        if reservation is not None:
            reservation.give_back()
    return sent


def hold(task: Task, reply: Reply, capped: OutboundCappedError, max_age: float,
         client: redis.Redis) -> dict[str, Any]:  # fmt: skip
    """Retry the delivery when the next hour opens; drop a reply too old to wait that long."""
    age = (datetime.now(UTC) - reply.created_at).total_seconds()
    if age + capped.retry_in > max_age:
        log.info("reply %s dropped: held by the outbound cap past GPT4P_OUTBOUND_HOLD_MAX_AGE",
                 reply.job_id)  # fmt: skip
        _count_failure(client, reply.channel, "capped")
        return {"status": "dropped (outbound cap)"}
    raise task.retry(countdown=capped.retry_in)


def _count_failure(client: redis.Redis, channel: str, reason: str) -> None:
    Metrics(client).count("gpt4p_delivery_failures", {"channel": channel, "reason": reason})


class Delivery(ABC):
    """One try at delivering `reply` through one channel, from within its Celery task."""

    channel: ClassVar[str]
    # What the task's result says beside its status when nothing went out.
    nothing_sent: ClassVar[dict[str, Any]] = {}

    def __init__(self, task: Task, reply: Reply) -> None:
        self.task = task
        self.reply = reply
        self.settings: Settings = get_settings()
        self.redis = broker_redis()
        # The channel module's logger, so that a line says which channel wrote it.
        self.log = logging.getLogger(type(self).__module__)

    @property
    @abstractmethod
    def policy(self) -> DeliveryPolicy:
        """This channel's retries, backoff and hourly cap, from the settings."""

    @property
    @abstractmethod
    def recipient(self) -> str:
        """The recipient as logs may name them: a pseudonym, never the address."""

    @abstractmethod
    def send(self) -> Outcome:
        """Send the reply, each message exactly once (claimed before, recorded after).

        Raise `TransientDeliveryError` or `PermanentDeliveryError` once the claims are
        settled; take the sends from `cap()` right before the first goes out.
        """

    def refused(self, error: PermanentDeliveryError) -> dict[str, Any]:
        """Act on a permanent refusal; return what the task's result adds to its status."""
        return dict(self.nothing_sent)

    def cap(self) -> OutboundCap:
        """This hour's count of what the channel sends, shared by every delivery process."""
        return OutboundCap(self.redis, self.channel, self.policy.per_hour)

    def retry_later(self) -> Retry:
        """Raise the task's retry, after the channel's backoff."""
        return self.task.retry(countdown=self.policy.retry_in(self.task.request.retries))

    def run(self) -> dict[str, Any]:
        """Deliver the reply once: the task's result, or the task's retry raised."""
        with bind_job(self.reply.job_id):
            try:
                return self._try_send()
            except OutboundCappedError as capped:
                max_age = self.settings.outbound_hold_max_age
                return hold(self.task, self.reply, capped, max_age, self.redis)

    def _try_send(self) -> dict[str, Any]:
        job, who = self.reply.job_id, self.recipient
        try:
            outcome = self.send()
        except TransientDeliveryError as error:
            retries = self.task.request.retries
            if retries >= self.policy.max_retries:
                self.log.error("reply %s to %s abandoned after %d retries: %s",
                               job, who, retries, error)  # fmt: skip
                _count_failure(self.redis, self.channel, "abandoned")
                return {**self.nothing_sent, "status": "abandoned"}
            self.log.warning("reply %s to %s: %s; retrying", job, who, error)
            raise self.retry_later() from None
        except PermanentDeliveryError as error:
            self.log.warning("reply %s to %s refused: %s", job, who, error)
            details = self.refused(error)
            _count_failure(self.redis, self.channel, "refused")
            return {**details, "status": "refused"}
        if outcome.status == DELIVERED:
            self.log.info("reply %s sent to %s%s", job, who, outcome.how)
            Metrics(self.redis).count("gpt4p_deliveries", {"channel": self.channel})
        return outcome.result()
