"""Handing a job over to a helper, so that no inference slot waits while the helper runs.

The inference task sends the helper's task to the helper's queue, linked to a
continuation, and returns at once without a result (Celery's `Ignore`, as
`Task.replace` does); the job is answered later by the continuation
(AFTER_HELPER_TASK, in `workers.tasks`), run on the job's own queue *under the
job's id*, so that its return value is the job's reply, stored where the channel
waits (``celery-task-meta-<job id>``). It carries one of:

* the helper's value, when the helper returned;
* a failure sent by `helper_failed`, the errback Celery runs in the helper's
  worker when it killed the helper (hard time limit) or the helper's process died;
* the failure "late", sent by the job ledger in the job's place when the job has
  no answer and no continuation is queued or running: the helper's message was
  lost in a Redis crash, its worker died with nobody to take its message, or its
  queue was too long (the message expires). The ledger looks at the job once
  `within` (the helper's time limit + HARD_LIMIT_MARGIN_S + WAIT_MARGIN_S, i.e.
  + 15 s) and its grace (2 x GPT4P_WORKER_HEARTBEAT_TTL) have passed since the
  hand-over, and sends "late" on the second sweep that finds the job nowhere.
  Sweeps come every TTL/2 to 5/6 TTL (a lock of TTL/2; every worker tries each
  TTL/3; 2/3 TTL with one worker), so "late" is sent at most the helper's time
  limit + 15 s + 11/3 TTL after the hand-over (90 s with the defaults: a 20 s
  helper, a 15 s TTL), then waits for a free slot on the job's queue.

The helper's result is never stored in Redis (``ignore_result``): its value
travels in the continuation's message, deleted once acknowledged. A continuation
stops without answering only when the job already has a final reply stored
(`answered`: the ledger's own test, so a failure stored during a Redis outage is
no answer); a continuation run again because its process died answers. One job
may get several continuations (Celery runs the errback twice at a hard time
limit); each that finds no reply stored stores one, and the person still gets
one answer: a waiting caller takes the first reply stored, and every delivery of
the job has the fixed id ``<job id>.deliver`` (SMS parts and the email send are
claimed per job).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from answer.routing import HelperCall
from kernel.contract import (
    AFTER_HELPER_TASK,
    HARD_LIMIT_MARGIN_S,
    HELPER_FAILED_TASK,
    helper_task,
)
from workers import ledger
from workers.app import app

log = logging.getLogger(__name__)

# Beyond the helper's hard limit: time for its queue and the continuation's message.
WAIT_MARGIN_S = 10.0


def helper_call_id(job_id: str) -> str:
    """The task id of the helper call made for job `job_id`."""
    return f"{job_id}.helper"


def hand_over(app: Celery, client: redis.Redis, call: HelperCall, queue: str) -> None:
    """Queue `call`'s helper with its continuation on `queue`; the ledger answers the job if
    all else is lost.

    Raises on Redis errors. The job is then run again if the ledger's fallback could not
    be written; once it is written (the helper's call may have gone out), the ledger
    answers the job with the "late" continuation instead."""
    job, name = call.then.job, call.info.name
    then = call.then.model_dump(mode="json")
    within = call.info.time_limit + HARD_LIMIT_MARGIN_S + WAIT_MARGIN_S
    # First the fallback, then the call: a crash in between leaves a job answered late.
    ledger.expect(client, job.id, AFTER_HELPER_TASK, [{"failure": "late"}, then], queue,
                  within=within)  # fmt: skip
    finish = app.signature(AFTER_HELPER_TASK, args=[then], queue=queue, task_id=job.id)
    failed = app.signature(HELPER_FAILED_TASK, args=[then, queue])
    request = call.request
    app.send_task(
        helper_task(name), args=[request.model_dump(mode="json")], queue=call.info.queue,
        task_id=helper_call_id(job.id), link=finish, link_error=failed,
        ignore_result=True, expires=within,
    )  # fmt: skip


def send_continuation(app: Celery, value: dict[str, Any], then: dict[str, Any], queue: str) -> None:
    """Answer the job of `then` with the helper's `value`, on the job's `queue`."""
    app.send_task(
        AFTER_HELPER_TASK, args=[value, then], queue=queue, task_id=str(then["job"]["id"])
    )


def answered(client: redis.Redis, job_id: str) -> bool:
    """Whether `job_id` has a final reply stored, so a continuation has nothing to do
    (a failure stored during a Redis outage is not final: see `ledger.finished`)."""
    return job_id in ledger.finished(client, [job_id])


# Not bound and with three free arguments: Celery calls it in the process that saw the
# failure (the helper worker) with the failed request and the exception.
@app.task(name=HELPER_FAILED_TASK)
def helper_failed(
    request: Any, exc: BaseException, traceback: Any, then: dict[str, Any], queue: str
) -> None:
    """Errback of a helper call that failed outside the helper's own code (killed at its
    hard time limit, its process lost): answer the job with a polite failure."""
    timed_out = isinstance(exc, TimeLimitExceeded | SoftTimeLimitExceeded)
    log.warning("helper %s failed: %s", then.get("helper"), exc.__class__.__name__)
    send_continuation(app, {"failure": "timeout" if timed_out else "error"}, then, queue)
