"""A worker's life in one place: what every kind of worker does at start, per job and at stop.

Each concern is one small class with named hooks (Dramatiq's middleware, in Celery's
terms): Celery's signals, and one consumer bootstep for reconnections, call the hooks of
every concern in `CONCERNS`, in order at start and in reverse at stop. What a worker
process holds for its whole life (its engine, helper gateway, recovery and heartbeats)
is one object, `this_process`.

Every worker (inference, delivery, helper) loads this module with its tasks
(celeryconfig ``imports``): each indexes its queues, runs recovery and strikes its finished
tasks off the ledger; only an inference worker loads the engine and announces itself
for readiness; a helper worker adds the registration of its helper (`helpers.worker`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import bootsteps
from celery.signals import (
    task_postrun,
    task_received,
    task_revoked,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from answer.engines import Engine, batches, create_engine
from answer.routing import HelperGateway
from kernel.contract import INFERENCE_QUEUE
from kernel.helper_contract import HelperSpec
from kernel.helper_registry import Heartbeat, HelperRegistry
from kernel.keys import HELPER_RATE_PREFIX
from kernel.metrics import Metrics
from kernel.model_files import model_label
from kernel.ratelimit import SenderRateLimit
from kernel.settings import get_settings
from workers import affinity, ledger
from workers.app import app, broker_redis
from workers.commandline import is_inference_worker
from workers.lane import FastLane
from workers.liveness import WorkerHeartbeat
from workers.recovery import Recovery, delivery_tag, instance_id, record_owner

log = logging.getLogger(__name__)


class WorkerProcess:
    """What this process holds for its whole life: its engine and helper gateway, made on
    first use, and the recovery and heartbeats its worker started.

    Their Redis client is the process's own (`broker_redis`), which a forked pool process
    never inherits; the pool processes only ever use the engine and the gateway.
    """

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._gateway: HelperGateway | None = None
        self.recovery: Recovery | None = None
        self.liveness: WorkerHeartbeat | None = None
        self.held: affinity.HeldJobs | None = None  # a batched worker's count of its jobs
        self.helper_heartbeat: Heartbeat | None = None

    def engine(self) -> Engine:
        """This process's engine, loaded on first use (normally at process start)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = create_engine(get_settings())
            return self._engine

    def drop_engine(self) -> None:
        """Free the engine (llama.cpp's memory), if one was loaded."""
        engine, self._engine = self._engine, None
        close = getattr(engine, "close", None)
        if close is not None:
            close()

    @property
    def keeps_conversations(self) -> bool:
        """Whether this process is a batched inference worker: its slots keep each
        conversation's tokens cached, so its next turn is best answered here."""
        return is_inference_worker() and batches(get_settings())

    def helper_gateway(self) -> HelperGateway:
        """This process's way to call helpers (one Redis connection pool)."""
        if self._gateway is None:
            settings = get_settings()
            registry = HelperRegistry(broker_redis(), ttl=settings.helper_ttl)
            limit = SenderRateLimit(broker_redis(), HELPER_RATE_PREFIX, settings.helper_rate_limit,
                                    settings.helper_rate_window)  # fmt: skip
            self._gateway = HelperGateway(registry, limit)
        return self._gateway


class WorkerConcern:
    """One concern of a worker's life; each hook runs at its moment and does nothing by default."""

    def process_started(self, process: WorkerProcess) -> None:
        """In each pool process, just after the fork (``worker_process_init``)."""

    def consumer_connected(self, process: WorkerProcess, consumer: Any) -> None:
        """Each time the consumer connects to Redis: first before `worker_ready`, then after
        each lost connection."""

    def worker_ready(self, process: WorkerProcess, consumer: Any) -> None:
        """Once, when the worker consumes its queues; no job runs until every hook returns."""

    def task_received(self, process: WorkerProcess, request: Any) -> None:
        """For each job the worker takes from its queues, before it runs."""

    def task_finished(self, process: WorkerProcess, task_id: str, state: str | None,
                      retval: object) -> None:  # fmt: skip
        """After each task has run (``task_postrun``), in the process that ran it: `state` is
        its final state (or RETRY), `retval` its result or exception."""

    def task_revoked(self, process: WorkerProcess, task_id: str) -> None:
        """When a task is revoked (``task_revoked``) instead of run."""

    def worker_shutting_down(self, process: WorkerProcess) -> None:
        """When the worker begins to shut down (``worker_shutting_down``), before its pool
        has finished its jobs."""

    def worker_stopping(self, process: WorkerProcess) -> None:
        """When the worker shuts down (``worker_shutdown``)."""

    def process_stopping(self, process: WorkerProcess) -> None:
        """In each pool process as it exits (``worker_process_shutdown``)."""


class QueueIndex(WorkerConcern):
    """Every worker adds the queues it consumes to the index whose depths the metrics report."""

    def worker_ready(self, process: WorkerProcess, consumer: Any) -> None:
        Metrics(broker_redis()).note_queues(q.name for q in consumer.task_consumer.queues)


class EngineLoading(WorkerConcern):
    """An inference worker loads its engine before its first job, once per process that runs jobs.

    Batched: one engine in the worker process itself (a threads pool), shared by the task
    threads. Unbatched: one job at a time per pool process, each loading its own engine
    after the fork (llama.cpp state must not be shared across a fork).
    """

    def process_started(self, process: WorkerProcess) -> None:
        if is_inference_worker() and not batches(get_settings()):
            _load_engine(process, worker_pid=os.getppid())

    def worker_ready(self, process: WorkerProcess, consumer: Any) -> None:
        if is_inference_worker() and batches(get_settings()):
            _load_engine(process, worker_pid=os.getpid())

    def worker_stopping(self, process: WorkerProcess) -> None:
        process.drop_engine()

    def process_stopping(self, process: WorkerProcess) -> None:
        process.drop_engine()


def _load_engine(process: WorkerProcess, worker_pid: int) -> None:
    started = time.monotonic()
    try:
        process.engine()
        where = f"{socket.gethostname()}:{os.getpid()}"
        Metrics(broker_redis()).gauge("gpt4p_model_load_seconds", {"worker": where},
                                      time.monotonic() - started)  # fmt: skip
    except Exception as error:
        # A model that cannot load never will: stop the worker instead of letting
        # the pool restart this process in a loop.
        log.critical("cannot load the model (%s); stopping this worker", error)
        os.kill(worker_pid, signal.SIGTERM)
        raise


class JobRecovery(WorkerConcern):
    """Every worker records which instance holds which job and returns the jobs of dead
    instances to their queues (`workers.recovery`); a reconnected consumer is a new instance."""

    def worker_ready(self, process: WorkerProcess, consumer: Any) -> None:
        settings = get_settings()
        # Past the hard time limit (plus a margin) no inference job can still be running.
        stuck_after = settings.task_time_limit * 1.2 + 10
        recovery = Recovery(app, broker_redis(), instance_id(consumer.hostname),
                            settings.worker_heartbeat_ttl, stuck_after)  # fmt: skip
        recovery.start()
        process.recovery = recovery

    def consumer_connected(self, process: WorkerProcess, consumer: Any) -> None:
        if process.recovery is not None:  # None at the first connection
            process.recovery.renew()

    def task_received(self, process: WorkerProcess, request: Any) -> None:
        tag, recovery = delivery_tag(request), process.recovery
        if tag is not None and recovery is not None:
            try:
                record_owner(recovery.client, tag, recovery.instance)
            except redis.RedisError as error:
                log.warning("job owner not recorded (%s)", error.__class__.__name__)

    def worker_stopping(self, process: WorkerProcess) -> None:
        if process.recovery is not None:
            process.recovery.stop()


class JobLedger(WorkerConcern):
    """A task that ran to its end, or was revoked, is struck off the ledger of sent tasks
    (`workers.ledger`), whose sweep re-sends the ones Redis lost."""

    def task_finished(self, process: WorkerProcess, task_id: str, state: str | None,
                      retval: object) -> None:  # fmt: skip
        ledger.settle(broker_redis(), task_id, state, retval)

    def task_revoked(self, process: WorkerProcess, task_id: str) -> None:
        ledger.settle(broker_redis(), task_id, "REVOKED")


class InferenceLiveness(WorkerConcern):
    """A worker that answers jobs says it is alive, and which model it serves, for /readyz
    and `status` (helpers and deliverers do not count). Listed after `EngineLoading`, so a
    batched engine is loaded before the worker counts as ready."""

    def worker_ready(self, process: WorkerProcess, consumer: Any) -> None:
        if INFERENCE_QUEUE not in {q.name for q in consumer.task_consumer.queues}:
            return
        heartbeat = WorkerHeartbeat(broker_redis(), consumer.hostname, model_label(get_settings()))
        heartbeat.start()
        process.liveness = heartbeat

    def worker_stopping(self, process: WorkerProcess) -> None:
        if process.liveness is not None:
            process.liveness.stop()


class SlotCount(WorkerConcern):
    """A batched worker says how many slots it has and how many jobs it holds, so that a
    conversation's next turn is sent to it only when it has room (`workers.affinity`)."""

    def worker_ready(self, process: WorkerProcess, consumer: Any) -> None:
        if process.keeps_conversations:
            settings = get_settings()
            held = affinity.HeldJobs(broker_redis(), consumer.hostname, settings.parallel,
                                     settings.priority_slots)  # fmt: skip
            held.start()
            process.held = held

    def task_received(self, process: WorkerProcess, request: Any) -> None:
        if process.held is not None and request.id:
            process.held.took(request.id)

    def task_finished(self, process: WorkerProcess, task_id: str, state: str | None,
                      retval: object) -> None:  # fmt: skip
        if process.held is not None:
            process.held.done(task_id)

    def task_revoked(self, process: WorkerProcess, task_id: str) -> None:
        if process.held is not None:
            process.held.done(task_id)

    def worker_shutting_down(self, process: WorkerProcess) -> None:
        if process.held is not None:
            process.held.stop()


class HelperRegistration(WorkerConcern):
    """A helper worker registers its helper, and keeps this instance live while it runs."""

    def __init__(self, helper: HelperSpec, ttl: float) -> None:
        self.helper, self.ttl = helper, ttl

    def worker_ready(self, process: WorkerProcess, consumer: Any) -> None:
        registry = HelperRegistry(broker_redis(), ttl=self.ttl)
        registry.register(self.helper, consumer.hostname)
        heartbeat = Heartbeat(registry, self.helper.name, consumer.hostname)
        heartbeat.start()
        process.helper_heartbeat = heartbeat
        log.info("helper %s registered as %s", self.helper.name, consumer.hostname)

    def worker_stopping(self, process: WorkerProcess) -> None:
        if process.helper_heartbeat is not None:
            process.helper_heartbeat.stop()


this_process = WorkerProcess()

# The concerns of every worker, in the order they start; they stop in reverse.
CONCERNS: list[WorkerConcern] = [
    QueueIndex(),
    EngineLoading(),
    JobRecovery(),
    JobLedger(),
    InferenceLiveness(),
    SlotCount(),
]


def add_concern(concern: WorkerConcern) -> None:
    """Add a concern of this process's kind of worker: it starts last and stops first."""
    CONCERNS.append(concern)


def _run(
    moment: str, hook: Callable[[WorkerConcern], None], concerns: Iterable[WorkerConcern]
) -> None:
    for concern in concerns:
        try:
            hook(concern)
        except Exception:
            # As Celery treats each receiver of a signal: logged, and the others still run.
            log.exception("%s failed at %s", concern.__class__.__name__, moment)


@worker_process_init.connect
def _process_started(**_: object) -> None:
    _run("process start", lambda c: c.process_started(this_process), CONCERNS)


@worker_ready.connect
def _worker_ready(sender: Any, **_: object) -> None:
    _run("worker ready", lambda c: c.worker_ready(this_process, sender), CONCERNS)


@task_received.connect
def _task_received(request: Any, **_: object) -> None:
    _run("job received", lambda c: c.task_received(this_process, request), CONCERNS)


@task_postrun.connect
def _task_finished(task_id: str, state: str | None = None, retval: object = None,
                   **_: object) -> None:  # fmt: skip
    _run("job finished", lambda c: c.task_finished(this_process, task_id, state, retval),
         CONCERNS)  # fmt: skip


@task_revoked.connect
def _task_revoked(request: Any, **_: object) -> None:
    task_id = getattr(request, "id", None)
    if task_id:
        _run("job revoked", lambda c: c.task_revoked(this_process, task_id), CONCERNS)


@worker_shutting_down.connect
def _worker_shutting_down(**_: object) -> None:
    _run("worker shutting down", lambda c: c.worker_shutting_down(this_process),
         reversed(CONCERNS))  # fmt: skip


@worker_shutdown.connect
def _worker_stopping(**_: object) -> None:
    _run("worker stop", lambda c: c.worker_stopping(this_process), reversed(CONCERNS))


@worker_process_shutdown.connect
def _process_stopping(**_: object) -> None:
    _run("process stop", lambda c: c.process_stopping(this_process), reversed(CONCERNS))


class _ConsumerConnected(bootsteps.StartStopStep):
    """Runs the concerns' `consumer_connected` each time the consumer (re)connects."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, consumer: Any) -> None:
        # Not caught: a failure here (Redis gone again) makes Celery reconnect once more.
        for concern in CONCERNS:
            concern.consumer_connected(this_process, consumer)


app.steps["consumer"].add(_ConsumerConnected)
app.steps["consumer"].add(FastLane)  # consumes nothing unless this is a batched inference worker
