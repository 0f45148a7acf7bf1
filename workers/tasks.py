"""The tasks of the answer path: a job answered (`infer`), or answered once its helper is
done (`after_helper`). When a worker loads its engine and what else it runs is
`workers.lifecycle`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from answer.core import answer, answer_after_helper
from answer.engines import (
    Engine,
    Generation,
    GenerationTimeLimitError,
    TextSink,
    delta_logprobs,
)
from answer.routing import AfterHelper, HelperCall
from kernel.channels import channel_facts
from kernel.contract import (
    AFTER_HELPER_TASK,
    INFERENCE_QUEUE,
    INFERENCE_TASK,
    ChatMessage,
    GenerationOptions,
    Job,
    Reply,
    TokenLogprob,
    shared_queue,
)
from kernel.metrics import FIRST_TOKEN_BUCKETS, LATENCY_BUCKETS, Metrics
from kernel.settings import get_settings
from kernel.streaming import encode_event, stream_channel
from workers import affinity, fairshare
from workers.app import app, broker_redis
from workers.client import enqueue_delivery
from workers.handover import answered, hand_over
from workers.lifecycle import this_process
from workers.privacy import delivered_summary

log = logging.getLogger(__name__)

# Streamed text is published at most this often (a person reads no faster). Below the
# batched engine's own 50 ms (TEXT_INTERVAL_S), so its pieces go out as they come rather
# than waiting, by a hair of jitter, for the next one.
STREAM_INTERVAL_S = 0.04


class TaskEngine:
    """This process's engine as a task runs it: Celery's soft time limit, which the prefork
    pool raises into the task wherever it is, reaches the answer path as its own
    `GenerationTimeLimitError` (the batched engine raises that itself), so the person
    gets the text so far or an apology."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name, self.model_name = engine.name, engine.model_name

    def generate(
        self, messages: Sequence[ChatMessage], options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:  # fmt: skip
        """The engine's generation; past the soft time limit, `GenerationTimeLimitError`."""
        try:
            return self.engine.generate(messages, options, on_text)
        except SoftTimeLimitExceeded as error:
            raise GenerationTimeLimitError("past the task's soft time limit") from error


@contextmanager
def _failing_as_celery_time_limit() -> Iterator[None]:
    """A time limit the answer path does not answer for (while the model decides whether to
    call a helper) fails the task as Celery's own, which callers word as "took too long"."""
    try:
        yield
    except GenerationTimeLimitError as error:
        raise SoftTimeLimitExceeded() from error


class _StreamPublisher:
    """Publishes a job's text as it is generated, at most one message per interval.

    The first text goes at once (time to first token); later tokens are gathered
    for STREAM_INTERVAL_S, so a fast model is not slowed by a Redis message, an
    SSE event and a wake-up of every process per token. `flush` sends the rest.
    """

    def __init__(self, job: Job, client: redis.Redis) -> None:
        self.client, self.channel = client, stream_channel(job.id)
        self.pending: list[str] = []
        # With options.logprobs every delta carries its tokens' logprobs (a list, maybe empty).
        self.logprobs: list[TokenLogprob] | None = [] if job.options.logprobs else None
        self.last = 0.0
        # A requeued job starts over: tell the listener to drop what it had.
        client.publish(self.channel, encode_event("restart"))

    def __call__(self, text: str) -> None:
        self.pending.append(text)
        if self.logprobs is not None:
            self.logprobs.extend(delta_logprobs(text))
        if time.monotonic() - self.last >= STREAM_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Publish what is gathered."""
        if self.pending:
            event = encode_event("delta", "".join(self.pending), self.logprobs)
            self.client.publish(self.channel, event)
            self.pending.clear()
            if self.logprobs is not None:
                self.logprobs = []
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


class AnswerTask(Task):
    """A task that answers a job. What the caller need not wait for is written in one round
    trip once its reply is stored and published (`after_return`): the metrics, the job's
    release from its sender's fair share, and (a batched worker) that this worker now
    holds the job's conversation (`workers.affinity`)."""

    def after_return(self, status: str, retval: Any, task_id: str, args: tuple[Any, ...],
                     kwargs: dict[str, Any], einfo: Any) -> None:  # fmt: skip
        """After the result is stored (success or failure; not after `Ignore`)."""
        done: _Answered | None = getattr(self.request, "gpt4p_answered", None)
        job = done.job if done is not None else _job_of(args)
        pipe = broker_redis().pipeline(transaction=False)
        if done is not None:
            _observe(Metrics.riding(pipe), done.job, done.reply, done.worker, done.timing)
            if this_process.keeps_conversations:
                affinity.remember(pipe, done.job, done.worker)
        if job is not None:
            fairshare.release(pipe, job)
        try:
            pipe.execute(raise_on_error=False)
        except redis.RedisError as error:  # a sender's count ages out (workers.fairshare)
            log.warning("metrics or fair share not recorded (%s)", error.__class__.__name__)


@dataclass(frozen=True)
class _Answered:
    """A job's reply as its task returned it, for `AnswerTask.after_return`."""

    job: Job
    reply: Reply
    worker: str
    timing: _Timing


def _job_of(args: tuple[Any, ...]) -> Job | None:
    """The job a failed `infer` was given, if it was one."""
    try:
        return Job.model_validate(args[0])
    except (IndexError, ValueError):
        return None


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
    """The queue `task`'s message came from: a job's continuation goes back to it (to the
    shared queue when it came from one worker's own, which may be gone by then)."""
    delivery_info = task.request.delivery_info or {}
    return shared_queue(str(delivery_info.get("routing_key") or INFERENCE_QUEUE))


def _finish(task: Task, job: Job, reply: Reply, timing: _Timing,
            stream: _StreamPublisher | None) -> dict[str, Any]:  # fmt: skip
    """Close the stream, record and log the reply; its JSON is the task's result."""
    if stream is not None:
        stream.end()  # the listener stops here and waits for the reply, stored next
    worker = task.request.hostname or ""
    task.request.gpt4p_answered = _Answered(job, reply, worker, timing)  # for after_return
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
@app.task(name=INFERENCE_TASK, bind=True, base=AnswerTask, resultrepr_maxsize=1)
def infer(self: Task, job_data: dict[str, Any]) -> dict[str, Any]:
    """Answer one job; the returned dict is a `Reply` in JSON form.

    A job for a helper is handed over instead: this task ends without a result and the
    slot is free; `after_helper` stores the reply under the job's id later.
    """
    job = Job.model_validate(job_data)
    worker = self.request.hostname or ""
    helpers, tools = this_process.helper_gateway(), get_settings().model_tools
    timing = _Timing()
    stream = _StreamPublisher(job, broker_redis()) if job.options.stream else None
    with _failing_as_celery_time_limit():
        answered = answer(job, TaskEngine(this_process.engine()), worker, timing.wrap(stream),
                          helpers, tools)  # fmt: skip
    if isinstance(answered, HelperCall):
        hand_over(self.app, broker_redis(), answered, _queue_of(self))
        fairshare.release(broker_redis(), job)  # it holds no slot while the helper works
        raise Ignore()  # acknowledged, no result: the job's ledger entry now waits for it
    return _finish(self, job, answered, timing, stream)


# Under the job's id, so never "started": a duplicate continuation would overwrite the
# stored reply with STARTED, and a caller still waiting would wait on.
@app.task(name=AFTER_HELPER_TASK, bind=True, base=AnswerTask, resultrepr_maxsize=1,
          track_started=False)  # fmt: skip
def after_helper(self: Task, value: dict[str, Any], then_data: dict[str, Any]) -> dict[str, Any]:
    """Answer a job handed over to a helper with the helper's `value` (see workers.handover)."""
    then = AfterHelper.model_validate(then_data)
    job = then.job
    if answered(broker_redis(), job.id):
        # A duplicate (the errback reported twice) or one later than the ledger's "late":
        # the job has its reply. Without one, even a rerun answers (its process died).
        log.info("job %s was already answered; this helper answer is dropped", job.id)
        raise Ignore()
    outcome = this_process.helper_gateway().outcome(then.helper, value)
    timing = _Timing()
    stream = _StreamPublisher(job, broker_redis()) if job.options.stream else None
    reply = answer_after_helper(then, outcome, TaskEngine(this_process.engine()),
                                timing.wrap(stream))  # fmt: skip
    worker = self.request.hostname or ""
    return _finish(self, job, reply.model_copy(update={"worker": worker}), timing, stream)
