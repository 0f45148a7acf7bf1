"""The inference task, and the engine each worker process loads once at start."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Task, bootsteps
from celery.exceptions import Ignore
from celery.signals import (
    task_received,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from answer.core import answer, answer_after_helper
from answer.engines import INFERENCE_WORKER_ENV, Engine, TextSink, batches, create_engine
from answer.routing import RATE_PREFIX, AfterHelper, HelperCall, HelperGateway
from kernel.channels import channel_facts
from kernel.contract import (
    AFTER_HELPER_TASK,
    INFERENCE_QUEUE,
    INFERENCE_TASK,
    Job,
    Reply,
)
from kernel.helper_registry import HelperRegistry
from kernel.metrics import FIRST_TOKEN_BUCKETS, LATENCY_BUCKETS, Metrics
from kernel.model_files import model_label
from kernel.ratelimit import SenderRateLimit
from kernel.settings import get_settings
from kernel.streaming import encode_event, stream_channel
from workers.app import app, broker_redis
from workers.client import enqueue_delivery
from workers.handover import answered, hand_over
from workers.liveness import WorkerHeartbeat
from workers.privacy import delivered_summary
from workers.recovery import Recovery, delivery_tag, instance_id, record_owner

log = logging.getLogger(__name__)

_engine: Engine | None = None
_engine_lock = threading.Lock()
_gateway: HelperGateway | None = None


def get_gateway() -> HelperGateway:
    """This process's way to call helpers (one Redis connection pool)."""
    global _gateway
    if _gateway is None:
        settings = get_settings()
        registry = HelperRegistry(broker_redis(), ttl=settings.helper_ttl)
        limit = SenderRateLimit(broker_redis(), RATE_PREFIX, settings.helper_rate_limit,
                                settings.helper_rate_window)  # fmt: skip
        _gateway = HelperGateway(registry, limit)
    return _gateway


def get_engine() -> Engine:
    """This process's engine, loaded on first use (normally at process start)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = create_engine(get_settings())
        return _engine


def _preload(where: str) -> None:
    started = time.monotonic()
    try:
        get_engine()
        process = f"{socket.gethostname()}:{os.getpid()}"
        _metrics().gauge("gpt4p_model_load_seconds", {"worker": process},
                         time.monotonic() - started)  # fmt: skip
    except Exception as error:
        # A model that cannot load never will: stop the worker instead of letting
        # the pool restart this process in a loop.
        log.critical("cannot load the model (%s); stopping this worker", error)
        os.kill(os.getppid() if where == "child" else os.getpid(), signal.SIGTERM)
        raise


@worker_process_init.connect
def _load_engine_in_child(**_: object) -> None:
    # One job at a time per process: loaded in each pool process after the fork
    # (llama.cpp state must not be shared across fork; the first job should not wait).
    if os.environ.get(INFERENCE_WORKER_ENV) == "1" and not batches(get_settings()):
        _preload("child")


@worker_ready.connect
def _load_batched_engine(**_: object) -> None:
    # Batched: one engine in the worker process itself, shared by the task threads.
    if os.environ.get(INFERENCE_WORKER_ENV) == "1" and batches(get_settings()):
        _preload("main")


# Streamed text is published at most this often (a person reads no faster). Below the
# batched engine's own 50 ms (TEXT_INTERVAL_S), so its pieces go out as they come rather
# than waiting, by a hair of jitter, for the next one.
STREAM_INTERVAL_S = 0.04

_heartbeats: list[WorkerHeartbeat] = []
_recovery: list[Recovery] = []


@worker_ready.connect
def _start_recovery(sender: Any, **_: object) -> None:
    # Every worker (inference, delivery, helper) records who holds which job and
    # returns the jobs of dead workers to their queues.
    settings = get_settings()
    # Past the hard time limit (plus a margin) no inference job can still be running.
    stuck_after = settings.task_time_limit * 1.2 + 10
    recovery = Recovery(app, broker_redis(), instance_id(sender.hostname),
                        settings.worker_heartbeat_ttl, stuck_after)  # fmt: skip
    recovery.start()
    _recovery.append(recovery)


class _RenewInstanceOnReconnect(bootsteps.StartStopStep):
    """Runs each time the consumer (re)connects; on a reconnect, a new recovery instance."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, consumer: Any) -> None:
        for recovery in _recovery:  # empty on the first start (worker_ready comes after)
            recovery.renew()


app.steps["consumer"].add(_RenewInstanceOnReconnect)


@task_received.connect
def _record_owner(request: Any, **_: object) -> None:
    tag = delivery_tag(request)
    if tag is not None and _recovery:
        try:
            record_owner(_recovery[0].client, tag, _recovery[0].instance)
        except redis.RedisError as error:
            log.warning("job owner not recorded (%s)", error.__class__.__name__)


@worker_ready.connect
def _announce_inference_worker(sender: Any, **_: object) -> None:
    # Only workers that answer jobs count for readiness (not helpers or deliverers).
    queues = {q.name for q in sender.task_consumer.queues}
    if INFERENCE_QUEUE not in queues:
        return
    heartbeat = WorkerHeartbeat(broker_redis(), sender.hostname, model_label(get_settings()))
    heartbeat.start()
    _heartbeats.append(heartbeat)


@worker_shutdown.connect
def _retire_inference_worker(**_: object) -> None:
    for heartbeat in _heartbeats:
        heartbeat.stop()
    for recovery in _recovery:
        recovery.stop()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _drop_engine(**_: object) -> None:
    global _engine
    engine, _engine = _engine, None
    close = getattr(engine, "close", None)
    if close is not None:
        close()


class _StreamPublisher:
    """Publishes a job's text as it is generated, at most one message per interval.

    The first text goes at once (time to first token); later tokens are gathered
    for STREAM_INTERVAL_S, so a fast model is not slowed by a Redis message, an
    SSE event and a wake-up of every process per token. `flush` sends the rest.
    """

    def __init__(self, job: Job, client: redis.Redis) -> None:
        self.client, self.channel = client, stream_channel(job.id)
        self.pending: list[str] = []
        self.last = 0.0
        # A requeued job starts over: tell the listener to drop what it had.
        client.publish(self.channel, encode_event("restart"))

    def __call__(self, text: str) -> None:
        self.pending.append(text)
        if time.monotonic() - self.last >= STREAM_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Publish what is gathered."""
        if self.pending:
            self.client.publish(self.channel, encode_event("delta", "".join(self.pending)))
            self.pending.clear()
            self.last = time.monotonic()

    def end(self) -> None:
        """Publish the rest and say that the text is complete."""
        self.flush()
        self.client.publish(self.channel, encode_event("end"))


class _Timing:
    """When a job started on this worker and when its first text appeared."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_text: float | None = None

    def wrap(self, sink: TextSink | None) -> TextSink:
        def on_text(text: str) -> None:
            if self.first_text is None and text.strip():
                self.first_text = time.monotonic()
            if sink is not None:
                sink(text)

        return on_text


def _metrics() -> Metrics:
    return Metrics(broker_redis())


def _record(job: Job, reply: Reply, worker: str, timing: _Timing) -> None:
    with _metrics().batch() as metrics:  # one round trip: the reply waits for it
        _observe(metrics, job, reply, worker, timing)


def _observe(metrics: Metrics, job: Job, reply: Reply, worker: str, timing: _Timing) -> None:
    elapsed = time.monotonic() - timing.started
    latency = (datetime.now(UTC) - job.created_at).total_seconds()
    metrics.observe("gpt4p_job_latency_seconds", {"channel": job.channel}, latency,
                    LATENCY_BUCKETS)  # fmt: skip
    if timing.first_text is not None and reply.engine not in {"helper"}:
        metrics.observe("gpt4p_time_to_first_token_seconds", {"engine": reply.engine},
                        timing.first_text - timing.started, FIRST_TOKEN_BUCKETS)  # fmt: skip
    if reply.completion_tokens:
        metrics.count("gpt4p_tokens_generated", {"model": reply.model}, reply.completion_tokens)
        if elapsed > 0:
            metrics.gauge("gpt4p_worker_tokens_per_second", {"worker": worker},
                          reply.completion_tokens / elapsed)  # fmt: skip


def _queue_of(task: Task) -> str:
    """The queue `task`'s message came from: a job's continuation goes back to it."""
    delivery_info = task.request.delivery_info or {}
    return str(delivery_info.get("routing_key") or INFERENCE_QUEUE)


def _finish(task: Task, job: Job, reply: Reply, timing: _Timing,
            stream: _StreamPublisher | None) -> dict[str, Any]:  # fmt: skip
    """Close the stream, record and log the reply; its JSON is the task's result."""
    if stream is not None:
        stream.end()  # the listener stops here and waits for the reply, stored next
    worker = task.request.hostname or ""
    _record(job, reply, worker, timing)
    log.info(
        "job %s answered on %s: %d+%d tokens in %.0f ms (%s)",
        job.id, job.channel, reply.prompt_tokens, reply.completion_tokens,
        reply.duration_ms, reply.finish_reason,
    )  # fmt: skip
    if channel_facts(job.channel).delivers_later:
        # The channel answers later: hand the reply to its delivery queue, and store only
        # a summary (no address, no text) as this task's result.
        enqueue_delivery(task.app, broker_redis(), reply)
        return delivered_summary(reply)
    return reply.model_dump(mode="json")


# resultrepr_maxsize=1: events (Flower, `celery events`) show "{, ...}", not the answer.
@app.task(name=INFERENCE_TASK, bind=True, resultrepr_maxsize=1)
def infer(self: Task, job_data: dict[str, Any]) -> dict[str, Any]:
    """Answer one job; the returned dict is a `Reply` in JSON form.

    A job for a helper is handed over instead: this task ends without a result and the
    slot is free; `after_helper` stores the reply under the job's id later.
    """
    job = Job.model_validate(job_data)
    worker = self.request.hostname or ""
    helpers, tools = get_gateway(), get_settings().model_tools
    timing = _Timing()
    stream = _StreamPublisher(job, broker_redis()) if job.options.stream else None
    answered = answer(job, get_engine(), worker, timing.wrap(stream), helpers, tools)
    if isinstance(answered, HelperCall):
        hand_over(self.app, broker_redis(), answered, _queue_of(self))
        raise Ignore()  # acknowledged, no result: the job's ledger entry now waits for it
    return _finish(self, job, answered, timing, stream)


# Under the job's id, so never "started": a duplicate continuation would overwrite the
# stored reply with STARTED, and a caller still waiting would wait on.
@app.task(name=AFTER_HELPER_TASK, bind=True, resultrepr_maxsize=1, track_started=False)
def after_helper(self: Task, value: dict[str, Any], then_data: dict[str, Any]) -> dict[str, Any]:
    """Answer a job handed over to a helper with the helper's `value` (see workers.handover)."""
    then = AfterHelper.model_validate(then_data)
    job = then.job
    if answered(broker_redis(), job.id):
        # A duplicate (the errback reported twice) or one later than the ledger's "late":
        # the job has its reply. Without one, even a rerun answers (its process died).
        log.info("job %s was already answered; this helper answer is dropped", job.id)
        raise Ignore()
    outcome = get_gateway().outcome(then.helper, value)
    timing = _Timing()
    stream = _StreamPublisher(job, broker_redis()) if job.options.stream else None
    reply = answer_after_helper(then, outcome, get_engine(), timing.wrap(stream))
    worker = self.request.hostname or ""
    return _finish(self, job, reply.model_copy(update={"worker": worker}), timing, stream)
