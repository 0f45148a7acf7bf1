"""Putting jobs on the queue and getting their replies back, as every channel does.

`submit` is the one way a job enters the system. A job that carries an
idempotency key from its source (Twilio's MessageSid, an email's Message-ID,
an HTTP ``Idempotency-Key``) is enqueued once however often it arrives: the
key is claimed in Redis with SET NX and later arrivals get the first job's id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.client import Pipeline

from kernel.channels import channel_priority
from kernel.contract import (
    INFERENCE_QUEUE,
    INFERENCE_TASK,
    MESSAGE_PRIORITY,
    Job,
    Reply,
    delivery_queue,
    delivery_task,
    queue_for,
)
from kernel.keys import IDEMPOTENCY_PREFIX, LEDGER_KEY, RESULT_KEY_PREFIX
from kernel.metrics import Metrics
from kernel.redis_client import RedisUnavailableError, redis_client
from kernel.redis_urls import redact_url
from kernel.settings import get_settings
from workers import affinity, fairshare, ledger

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL_S = 7 * 24 * 3600
RESULT_MAX_AGE_S = 24 * 3600  # celeryconfig.result_expires


class JobTimeoutError(TimeoutError):
    """No worker answered the job in time."""


class JobFailedError(RuntimeError):
    """The worker could not answer the job; the message is safe to show a user."""


def idempotency_key(job: Job) -> str | None:
    """The Redis key that claims `job`'s source id, scoped to its channel."""
    if not job.idempotency_key:
        return None
    return f"{IDEMPOTENCY_PREFIX}{job.channel}:{job.idempotency_key}"


def submit(
    app: Celery, job: Job, queue: str = INFERENCE_QUEUE, client: redis.Redis | None = None
) -> str:
    """Enqueue `job` (once per idempotency key) and return the id whose reply to wait for.

    `client` is a Redis client of the same server to reuse (a channel's pool);
    without one, a short-lived connection is made.
    """
    url = str(app.conf.broker_url)
    own_client = client is None
    if client is None:
        client = redis_client(url, socket_connect_timeout=5, socket_timeout=5)
    key = idempotency_key(job)
    claimed = False
    try:
        # The first command below fails fast through `client` if Redis is down (Celery
        # itself would retry for many seconds); the ledger entry precedes Celery's send.
        if key is not None:
            if not client.set(key, job.id, nx=True, ex=IDEMPOTENCY_TTL_S):
                existing = cast(bytes | None, client.get(key))
                if existing and not _claimed_but_never_queued(client, job, key, existing.decode()):
                    log.info("duplicate of job %s ignored", existing.decode())
                    return existing.decode()
            claimed = True
        job, shared, demoted, host = _placed(client, job, queue)
        priority = job.options.priority or "normal"
        queue = affinity.routed(shared, host, priority)

        def count(pipe: Pipeline) -> None:  # in the ledger's round trip
            metrics = Metrics.riding(pipe)
            metrics.count("gpt4p_jobs_received", {"channel": job.channel})
            metrics.count("gpt4p_jobs_by_priority", {"priority": priority})
            if demoted:
                metrics.count("gpt4p_jobs_over_fair_share", {"channel": job.channel})
            metrics.note_queues([queue])  # /metrics reports its depth without a SCAN

        # Ledgered: a Redis crash in the instant a worker pops the job cannot lose it.
        # Bounded: a webhook must answer Twilio within its 15 s, spooling if need be.
        retry_policy = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5}
        # Sent to a worker's own queue, it is ledgered for the shared one: the sweep sends
        # it there again if that worker dies before taking it (workers.affinity).
        ledger.send(app, client, INFERENCE_TASK, [job.to_task_arg()], queue, task_id=job.id,
                    along=count, resend_to=queue_for(shared, priority),
                    priority=MESSAGE_PRIORITY[priority], retry=True,
                    retry_policy=retry_policy)  # fmt: skip
    except (redis.RedisError, OperationalError) as error:
        if claimed and key is not None:
            _release(client, key)  # a retry of this source message must enqueue it again
        raise RedisUnavailableError(
            f"cannot enqueue: Redis at {redact_url(url)} is unreachable ({error})"
        ) from None
    finally:
        if own_client:
            client.close()
    return job.id


def _placed(client: redis.Redis, job: Job, queue: str) -> tuple[Job, str, bool, str | None]:
    """Where `job`, meant for shared queue `queue`, goes (one round trip): the job with its
    priority decided (the caller's, else its channel's; bulk when its sender is over their
    fair share), the shared queue, whether it was demoted, and the batched worker holding
    its conversation with room for it, if any (`workers.affinity`)."""
    settings = get_settings()
    priority = job.options.priority or channel_priority(job.channel, settings)
    pipe = client.pipeline(transaction=False)
    count_at = None
    if settings.sender_slots:
        max_age = settings.task_time_limit * 1.2 + 10  # as the reaper's "stuck" (lifecycle)
        count_at = fairshare.claim(pipe, job, max_age)
    # Not bulk: it would wait behind every normal job in one worker's own queue, where no
    # other worker can take it.
    model = affinity.routable(queue) if priority != "bulk" else None
    question = None
    if model is not None:
        question = affinity.Question(job, model, priority, settings.worker_heartbeat_ttl)
        question.ask(pipe)
    answers = pipe.execute(raise_on_error=False) if len(pipe) else []
    demoted = (
        count_at is not None
        and priority != "bulk"
        and not fairshare.within(answers[count_at], settings.sender_slots)
    )
    if demoted:
        log.info("job %s is over its sender's fair share: queued as bulk", job.id)
        priority = "bulk"
    host = None
    if question is not None and not demoted:
        host = question.answer(client, answers[-1])
    options = job.options.model_copy(update={"priority": priority})
    return job.model_copy(update={"options": options}), queue, demoted, host


def enqueue_delivery(app: Celery, client: redis.Redis, reply: Reply) -> None:
    """Hand `reply` to its channel's delivery queue, ledgered like a job (a Redis crash
    cannot lose it); the fixed id makes a re-run hand off the same delivery.

    `client` is a Redis client of the broker's server."""
    ledger.send(app, client, delivery_task(reply.channel), [reply.model_dump(mode="json")],
                delivery_queue(reply.channel), task_id=f"{reply.job_id}.deliver")  # fmt: skip


def _claimed_but_never_queued(client: redis.Redis, job: Job, key: str, existing: str) -> bool:
    """A replay of the same job (a spooled SMS) whose first try claimed its key, then
    lost Redis before the job was ledgered: it must be queued now, not ignored."""
    if existing != job.id:
        return False
    # Only while its result would still be stored: an older claim's result has expired.
    age = IDEMPOTENCY_TTL_S - cast(int, client.ttl(key))
    if age > RESULT_MAX_AGE_S:
        return False
    return not client.hexists(LEDGER_KEY, job.id) and not client.exists(RESULT_KEY_PREFIX + job.id)


def _release(client: redis.Redis, key: str) -> None:
    try:
        client.delete(key)
    except redis.RedisError:
        log.warning("could not release idempotency key after a failed enqueue; it expires")


def _reply_from_meta(meta: dict[str, Any]) -> Reply | None:
    status = meta.get("status")
    if status == "SUCCESS":
        return Reply.model_validate(meta["result"])
    if status in {"FAILURE", "REVOKED"}:
        result = meta.get("result") or {}
        kind = result.get("exc_type", status) if isinstance(result, dict) else status
        if kind in {"SoftTimeLimitExceeded", "TimeLimitExceeded"}:
            raise JobFailedError("the model took too long to answer")
        raise JobFailedError(f"the worker could not answer ({kind})")
    return None


def wait_for_reply(app: Celery, job_id: str, timeout: float) -> Reply:
    """Block until the reply to `job_id` exists (for the CLI)."""
    result = AsyncResult(job_id, app=app)
    try:
        value = result.get(timeout=timeout, propagate=False, interval=0.05)
    except CeleryTimeoutError:
        raise JobTimeoutError(f"no worker answered within {timeout:g}s") from None
    reply = _reply_from_meta({"status": result.state, "result": _failure_info(result, value)})
    if reply is None:
        raise JobTimeoutError(f"no worker answered within {timeout:g}s")
    return reply


def _failure_info(result: AsyncResult, value: Any) -> Any:
    if result.state == "FAILURE":
        return {"exc_type": type(value).__name__}
    return value


class _ReplyListener:
    """One pub/sub connection of a process's event loop, on which every waiting caller
    listens for its reply (Celery's result backend publishes each result on a channel of
    its key's name): a request costs a SUBSCRIBE and an UNSUBSCRIBE on it, not a new
    connection of its own (connect, AUTH, SELECT). A message lost while the connection
    was down costs nothing but time: each caller also reads its result once a second."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.pubsub = client.pubsub()
        # Per channel, the inbox of each caller waiting on it (two requests can wait for
        # one job: the same Idempotency-Key).
        self.inboxes: dict[str, list[asyncio.Queue[bytes]]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def listen(self, channel: str, inbox: asyncio.Queue[bytes]) -> None:
        """Subscribe to `channel`: what is published there comes into `inbox`."""
        self.inboxes.setdefault(channel, []).append(inbox)
        await self.pubsub.subscribe(channel)
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read(), name="reply-listener")

    async def stop(self, channel: str, inbox: asyncio.Queue[bytes]) -> None:
        """Stop listening to `channel` into `inbox` (unsubscribed when no one else does)."""
        waiting = self.inboxes.get(channel, [])
        if inbox in waiting:
            waiting.remove(inbox)
        if waiting:
            return
        self.inboxes.pop(channel, None)
        if self.pubsub.connection is not None:
            try:
                await self.pubsub.unsubscribe(channel)
            except (aioredis.RedisError, OSError) as error:  # gone with the connection
                log.debug("reply listener: unsubscribe failed (%s)", error)

    async def _read(self) -> None:
        while self.inboxes or self.pubsub.subscribed:
            try:
                message = await self.pubsub.get_message(ignore_subscribe_messages=True,
                                                        timeout=1.0)  # fmt: skip
            except (aioredis.RedisError, OSError) as error:
                log.debug("reply listener: %s; callers read their results meanwhile", error)
                await asyncio.sleep(0.5)
                continue
            if message is not None and message.get("type") == "message":
                channel = message["channel"]
                name = channel.decode() if isinstance(channel, bytes) else str(channel)
                for inbox in self.inboxes.get(name, []):
                    inbox.put_nowait(message["data"])


# Per event loop (a closed loop's listeners go with it), per client.
_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _ReplyListener]] = (
    weakref.WeakKeyDictionary()
)


def _listener(client: aioredis.Redis) -> _ReplyListener:
    """The reply listener of `client` on the running event loop."""
    mine = _listeners.setdefault(asyncio.get_running_loop(), {})
    if id(client) not in mine:
        mine[id(client)] = _ReplyListener(client)
    return mine[id(client)]


async def await_reply(client: aioredis.Redis, job_id: str, timeout: float) -> Reply:
    """Wait without blocking the event loop until the reply to `job_id` is stored."""
    key = RESULT_KEY_PREFIX + job_id
    listener, inbox = _listener(client), asyncio.Queue[bytes]()
    try:
        await listener.listen(key, inbox)
        # Subscribed first, then read: a result stored in between is not missed.
        raw = await client.get(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if raw is not None:
                reply = _reply_from_meta(json.loads(raw))
                if reply is not None:
                    return reply
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise JobTimeoutError(f"no worker answered within {timeout:g}s")
            try:
                raw = await asyncio.wait_for(inbox.get(), min(remaining, 1.0))
            except TimeoutError:
                raw = await client.get(key)
    finally:
        await listener.stop(key, inbox)
