"""Job priorities: a person's message goes first, and one sender cannot take every slot.

Real Redis and real workers: a job's priority decides the queue it waits in (a fast lane
for interactive jobs, Celery's priority 9 for bulk), an echo worker started after the jobs
were queued answers them in that order, and a batched model worker whose every slot holds
a long bulk generation still starts a person's message at once, from its fast lane.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import cast

import pytest
import redis
from celery import Celery

from kernel.contract import ChatMessage, GenerationOptions, Job, Priority
from kernel.keys import PRIORITY_SEPARATOR, RESULT_KEY_PREFIX, UNACKED_KEY
from kernel.metrics import indexed_queue_depths
from kernel.settings import get_settings
from tests.conftest import (
    base_env,
    start_worker,
    stop_process,
    wait_for,
)
from workers.client import submit, wait_for_reply

DB = 30  # this module's database on the session's Redis


def job(channel: str, user: str, text: str = "hello", priority: Priority | None = None,
        **options: object) -> Job:  # fmt: skip
    return Job(channel=channel, user=user, reply_to=user,
               messages=[ChatMessage(role="user", content=text)],
               options=GenerationOptions(priority=priority, **options))  # fmt: skip


def queued_ids(client: redis.Redis, key: str) -> list[str]:
    """The task ids waiting in the Redis list `key`, oldest first."""
    raw = cast(list[bytes], client.lrange(key, 0, -1))
    return [json.loads(m)["headers"]["id"] for m in reversed(raw)]


def test_each_job_waits_in_the_queue_of_its_priority(client_app: Celery,
                                                     db_url: str) -> None:  # fmt: skip
    client = redis.Redis.from_url(db_url)
    sms, api = job("sms", "+15550001"), job("http", "key-a")
    batch, urgent = (
        job("http", "key-b", priority="bulk"),
        job("http", "key-c", "now", "interactive"),
    )
    for each in (sms, api, batch, urgent):
        submit(client_app, each, client=client)
    # A person's SMS (and an API call that asks for it) in the fast lane; an API call in the
    # queue itself; a bulk one behind it, in Celery's priority-9 list of the same queue.
    assert queued_ids(client, "inference.interactive") == [sms.id, urgent.id]
    assert queued_ids(client, "inference") == [api.id]
    assert queued_ids(client, f"inference{PRIORITY_SEPARATOR}9") == [batch.id]
    # /metrics counts the bulk jobs in their queue's depth.
    depths = indexed_queue_depths(client)
    assert depths["inference"] == 2 and depths["inference.interactive"] == 2
    client.close()


def test_a_sender_over_their_fair_share_waits_behind_everyone_else(
    client_app: Celery, db_url: str, state_dir: Path
) -> None:
    cap = get_settings().sender_slots
    client = redis.Redis.from_url(db_url)
    flood = [job("sms", "+15550002", f"message {i}") for i in range(cap + 2)]
    for each in flood:
        submit(client_app, each, client=client)
    other = job("sms", "+15550003", "me too")
    submit(client_app, other, client=client)
    lane = queued_ids(client, "inference.interactive")
    assert lane == [*(j.id for j in flood[:cap]), other.id]
    assert queued_ids(client, f"inference{PRIORITY_SEPARATOR}9") == [j.id for j in flood[cap:]]
    # No phone number in clear in Redis's keys.
    assert not [k for k in cast(list[bytes], client.keys("*")) if b"15550002" in k]

    # One job at a time: the worker answers the other sender before the flood's surplus.
    env = base_env(state_dir, redis_url=db_url, engine="echo", worker_concurrency="1")
    worker = start_worker(env, "fair@test")
    try:
        order = [*flood, other]
        for each in order:  # answered (their replies handed to the SMS deliverer)
            wait_for(lambda j=each: _done_at(client, j.id), 60, f"job {each.id} answered")
    finally:
        stop_process(worker)
    done = {j.id: _done_at(client, j.id) for j in order}
    assert done[other.id] < min(done[j.id] for j in flood[cap:])
    # Answered, they no longer count: the sender's next message is interactive again.
    again = job("sms", "+15550002", "thanks")
    submit(client_app, again, client=client)
    assert queued_ids(client, "inference.interactive") == [again.id]
    client.close()


def _done_at(client: redis.Redis, job_id: str) -> datetime | None:
    """When the job's task succeeded, or None while it has not."""
    raw = cast(bytes | None, client.get(RESULT_KEY_PREFIX + job_id))
    meta = json.loads(raw) if raw else {}
    return datetime.fromisoformat(meta["date_done"]) if meta.get("status") == "SUCCESS" else None


@pytest.mark.model
def test_a_persons_message_starts_at_once_while_bulk_work_fills_every_slot(
    client_app: Celery, db_url: str, state_dir: Path
) -> None:
    env = base_env(state_dir, redis_url=db_url, engine="llama", n_ctx="1024",
                   parallel="2", priority_slots="1")  # fmt: skip
    worker = start_worker(env, "lane@test", timeout=180)
    client = redis.Redis.from_url(db_url)
    try:
        story = "Write a long story about the sea."
        bulk = [job("http", f"key-{i}", story, "bulk", max_tokens=200, ignore_eos=True,
                    temperature=0.0) for i in range(3)]  # fmt: skip
        for each in bulk:
            submit(client_app, each, client=client)

        def held_and_waiting() -> bool:
            held = cast(int, client.hlen(UNACKED_KEY))
            return held == 2 and len(queued_ids(client, f"inference{PRIORITY_SEPARATOR}9")) == 1

        # Both GPT4P_PARALLEL slots generate; the third bulk job waits in its queue.
        wait_for(held_and_waiting, 60, "two bulk jobs held and one queued")
        person = job("sms", "+15550004", "What is the capital of France?", max_tokens=8)
        person = person.model_copy(update={"channel": "cli"})  # its reply is stored for us
        submit(client_app, person, client=client)
        reply = wait_for_reply(client_app, person.id, timeout=60)
        assert reply.text.strip()

        # Answered while the bulk jobs were still being generated and one still waited.
        def state() -> str:
            return ", ".join(f"{j.id[:8]}: {_done_at(client, j.id) or 'not done'}" for j in bulk)

        assert not any(_done_at(client, j.id) for j in bulk), state()
        assert len(queued_ids(client, f"inference{PRIORITY_SEPARATOR}9")) == 1, state()
    finally:
        client.flushdb()  # the bulk jobs' messages: nobody needs their answers
        stop_process(worker)
        client.close()
