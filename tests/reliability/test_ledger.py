"""A job Redis lost in the instant a worker took it is run all the same.

Lost between a worker's pop and its unacked record: the ledger sends it again.
Recorded as unacked but never seen by the worker: the reaper requeues it.

The state a crash in that instant leaves is made exactly: the job is ledgered
and queued, then taken off the queue without an unacked record (as BRPOP
does before kombu writes the record), and Redis is the real server.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import task_postrun

from kernel.contract import (
    INFERENCE_QUEUE,
    INFERENCE_TASK,
    ChatMessage,
    Job,
    interactive_queue,
)
from kernel.keys import (
    IDEMPOTENCY_PREFIX,
    LEDGER_KEY,
    LEDGER_LOCK_KEY,
    LEDGER_MISSING_KEY,
    RECOVERY_INSTANCES_KEY,
    RESULT_KEY_PREFIX,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
)
from tests.conftest import (
    base_env,
    start_worker,
    stop_process,
    wait_for,
)
from workers import ledger
from workers.client import IDEMPOTENCY_TTL_S, submit
from workers.recovery import reap_once, record_owner

DB = 12  # this module's database on the session's Redis (db_url)


@pytest.fixture
def app(client_app: Celery) -> Celery:
    return client_app


def job(text: str = "hello", **fields: str) -> Job:
    return Job(channel="cli", user="tester", reply_to="cli",
               messages=[ChatMessage(role="user", content=text)], **fields)  # fmt: skip


def queued_ids(client: redis.Redis, queue: str = INFERENCE_QUEUE) -> list[str]:
    messages = client.lrange(queue, 0, -1)
    return [json.loads(m)["properties"]["correlation_id"] for m in messages]


def lose(client: redis.Redis, queue: str = INFERENCE_QUEUE) -> str:
    """Take the next job off its queue and drop it, as a crash right after BRPOP does."""
    raw = client.rpop(queue)
    assert raw is not None
    return str(json.loads(raw)["properties"]["correlation_id"])


def send(app: Celery, client: redis.Redis, the_job: Job) -> str:
    return ledger.send(app, client, INFERENCE_TASK, [the_job.to_task_arg()], INFERENCE_QUEUE,
                       task_id=the_job.id)  # fmt: skip


def test_a_job_lost_from_redis_is_sent_again_once_with_its_id(
    app: Celery, client: redis.Redis
) -> None:
    job_id = send(app, client, job())
    assert lose(client) == job_id
    assert ledger.sweep(app, client, grace=0, recheck=0.2) == []  # seen missing once: wait
    resent = wait_for(lambda: ledger.sweep(app, client, grace=0, recheck=0.2), 5, "a resend")
    assert resent == [job_id]
    assert queued_ids(client) == [job_id]
    client.delete(LEDGER_LOCK_KEY)  # the next sweep, without waiting out the lock
    assert ledger.sweep(app, client, grace=0, recheck=0.0) == []  # queued now: left alone
    assert queued_ids(client) == [job_id]


def test_queued_and_held_jobs_are_never_sent_twice(app: Celery, client: redis.Redis) -> None:
    held, waiting = send(app, client, job("a")), send(app, client, job("b"))
    with app.connection_for_write() as connection:
        # A worker holds the first job: it sits in kombu's unacked record.
        message = connection.default_channel.basic_get(INFERENCE_QUEUE, no_ack=False)
        assert message is not None
        assert message.properties["correlation_id"] == held
        assert queued_ids(client) == [waiting]
        assert client.hlen(UNACKED_KEY) == 1
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # many sweeps, far past the recheck interval
            assert ledger.sweep(app, client, grace=0, recheck=0.05) == []
        assert queued_ids(client) == [waiting]
        assert client.hlen(UNACKED_KEY) == 1
        assert client.hlen(LEDGER_MISSING_KEY) == 0
        assert {k.decode() for k in client.hkeys(LEDGER_KEY)} == {waiting, held}


def test_a_job_taken_in_the_instant_of_a_crash_and_held_by_no_worker_is_requeued(
    app: Celery, client: redis.Redis
) -> None:
    # The crash came after kombu's unacked record but before the worker saw the job:
    # it sits unacknowledged with no holder, which neither the ledger (it is not
    # missing) nor the dead-worker reaper (no dead holder) would ever move.
    orphan, held = send(app, client, job("a")), send(app, client, job("b"))
    with app.connection_for_write() as connection:  # open: closing it restores its jobs
        channel = connection.default_channel
        tags = {}
        for _ in range(2):
            message = channel.basic_get(INFERENCE_QUEUE, no_ack=False)
            assert message is not None
            tags[message.properties["correlation_id"]] = str(message.delivery_tag)
        record_owner(client, tags[held], "live@host#1")
        client.zadd(RECOVERY_INSTANCES_KEY, {"live@host#1": time.time()})
        assert reap_once(app, client, ttl=5) == 0  # just taken: its worker may be recording it
        long_ago = time.time() - 6
        client.zadd(UNACKED_INDEX_KEY, {tags[orphan]: long_ago, tags[held]: long_ago})
        assert reap_once(app, client, ttl=5) == 1
        assert queued_ids(client) == [orphan]
        assert {k.decode() for k in client.hkeys(UNACKED_KEY)} == {tags[held]}


def test_a_job_that_already_has_its_answer_is_struck_not_sent_again(
    app: Celery, client: redis.Redis
) -> None:
    job_id = send(app, client, job())
    lose(client)
    client.set(RESULT_KEY_PREFIX + job_id, json.dumps({"status": "SUCCESS", "result": {}}))
    assert ledger.sweep(app, client, grace=0, recheck=0.0) == []
    assert client.hlen(LEDGER_KEY) == 0
    assert client.llen(INFERENCE_QUEUE) == 0


def test_a_job_that_failed_on_a_redis_outage_is_sent_again_not_struck(
    app: Celery, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import lifecycle  # connects the worker's receivers, the ledger's among them

    monkeypatch.setattr(lifecycle, "broker_redis", lambda: client)  # the worker's broker
    # A worker answered while Redis restarted and could not hand its reply on: the
    # task failed with a connection error and its message was acknowledged.
    outage, own_fault = send(app, client, job("a")), send(app, client, job("b"))
    lose(client), lose(client)
    for task_id, error in ((outage, redis.ConnectionError("refused")),
                           (own_fault, ValueError("a bug in the job"))):  # fmt: skip
        task_postrun.send(sender=None, task_id=task_id, state="FAILURE", retval=error)
        app.backend.mark_as_failure(task_id, error)
    assert {k.decode() for k in client.hkeys(LEDGER_KEY)} == {outage}
    assert ledger.sweep(app, client, grace=0, recheck=0.1) == []
    resent = wait_for(lambda: ledger.sweep(app, client, grace=0, recheck=0.1), 5, "a resend")
    assert resent == [outage]
    assert queued_ids(client) == [outage]


def test_young_entries_are_not_examined(app: Celery, client: redis.Redis) -> None:
    send(app, client, job())
    lose(client)
    for _ in range(3):
        assert ledger.sweep(app, client, grace=60, recheck=0.0) == []
    assert client.hlen(LEDGER_MISSING_KEY) == 0


def test_a_job_lost_again_and_again_is_given_up_loudly(
    app: Celery, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = send(app, client, job())
    resends = 0
    with caplog.at_level(logging.ERROR, logger="workers.ledger"):
        for _ in range(4 * (ledger.MAX_RESENDS + 1)):
            if client.llen(INFERENCE_QUEUE):
                lose(client)
            client.delete(LEDGER_LOCK_KEY)  # each sweep runs, however fast the loop
            resends += len(ledger.sweep(app, client, grace=0, recheck=0.0))
            if not client.hexists(LEDGER_KEY, job_id):
                break
    assert resends == ledger.MAX_RESENDS
    assert not client.hexists(LEDGER_KEY, job_id)
    assert "giving up" in caplog.text


def test_a_replayed_job_whose_claim_outlived_a_crash_is_queued(
    app: Celery, client: redis.Redis
) -> None:
    # First try: the idempotency key was claimed, then Redis died before the job was queued.
    replayed = job(idempotency_key="SMabc")
    client.set(f"{IDEMPOTENCY_PREFIX}cli:SMabc", replayed.id, ex=IDEMPOTENCY_TTL_S)
    lane = interactive_queue(INFERENCE_QUEUE)  # a cli job is interactive
    assert submit(app, replayed, client=client) == replayed.id
    assert queued_ids(client, lane) == [replayed.id]
    # A true duplicate (the job is ledgered and queued) is still not queued twice.
    assert submit(app, replayed, client=client) == replayed.id
    assert queued_ids(client, lane) == [replayed.id]


def test_a_replay_older_than_any_stored_answer_is_not_queued_again(
    app: Celery, client: redis.Redis
) -> None:
    # Answered two days ago: the result has expired, the claim has not.
    old = job(idempotency_key="SMold")
    client.set(f"{IDEMPOTENCY_PREFIX}cli:SMold", old.id, ex=IDEMPOTENCY_TTL_S - 2 * 86400)
    assert submit(app, old, client=client) == old.id
    assert queued_ids(client, interactive_queue(INFERENCE_QUEUE)) == queued_ids(client) == []


def answered(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The stored result of `job_id` once it succeeded (a STARTED record comes first)."""
    raw = client.get(RESULT_KEY_PREFIX + job_id)
    meta = json.loads(raw) if raw else None
    return meta if meta and meta.get("status") == "SUCCESS" else None


def test_a_worker_answers_a_job_that_redis_lost(
    app: Celery, client: redis.Redis, db_url: str, tmp_path: Path
) -> None:
    job_id = send(app, client, job("are you there?"))
    lose(client)  # nobody has it: not queued, not held
    env = base_env(tmp_path, redis_url=db_url, engine="echo", worker_heartbeat_ttl="1")
    worker = start_worker(env, "ledger@test")
    try:
        meta = wait_for(lambda: answered(client, job_id), 30, "the answer")
    finally:
        stop_process(worker)
    assert meta["result"]["text"] == "are you there?"
    assert client.hlen(LEDGER_KEY) == 0
