"""Conversation affinity: the next turn goes to the batched worker holding the conversation,
unless that worker is gone or has no room; a job sent to a worker that died is not lost.

Real Redis; the routing is read from where the jobs wait, and a real batched model worker
answers a conversation's turns (its reply names the worker).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import cast

import pytest
import redis
from celery import Celery

from kernel.contract import ChatMessage, GenerationOptions, Job, Priority, model_queue, worker_queue
from kernel.keys import (
    INFERENCE_BUSY_KEY,
    INFERENCE_LIVE_KEY,
    INFERENCE_MODELS_KEY,
    INFERENCE_SLOTS_KEY,
    LEDGER_KEY,
    LEDGER_LOCK_KEY,
)
from tests.conftest import (
    base_env,
    start_worker,
    stop_process,
    wait_for,
)
from workers import affinity, ledger
from workers.client import submit, wait_for_reply

DB = 31  # this module's database on the session's Redis
HOST = "model@elsewhere"


def turn(user: str, *texts: str, channel: str = "http", priority: Priority | None = None) -> Job:
    """A job of `user`'s conversation that began with texts[0] (answers in between)."""
    messages = []
    for i, text in enumerate(texts):
        messages.append(ChatMessage(role="user", content=text))
        if i < len(texts) - 1:
            messages.append(ChatMessage(role="assistant", content=f"answer {i}"))
    options = GenerationOptions(priority=priority, max_tokens=8, temperature=0.0)
    return Job(channel=channel, user=user, reply_to=user, messages=messages, options=options)


def where(client: redis.Redis, job: Job) -> list[str]:
    """The queues (lists) holding `job`'s message."""
    found = []
    for key in sorted(k.decode() for k in cast(list[bytes], client.keys("inference*"))):
        if any(job.id.encode() in m for m in cast(list[bytes], client.lrange(key, 0, -1))):
            found.append(key)
    return found


def a_worker_holds(client: redis.Redis, job: Job, busy: int = 0, model: str = "m",
                   beat: float | None = None) -> None:  # fmt: skip
    """HOST, alive (or last seen at `beat`), with 2 slots + 1 fast, holds `job`'s
    conversation and `busy` jobs."""
    client.zadd(INFERENCE_LIVE_KEY, {HOST: time.time() if beat is None else beat})
    client.hset(INFERENCE_MODELS_KEY, HOST, model)
    client.hset(INFERENCE_SLOTS_KEY, HOST, "2,1")
    client.hset(INFERENCE_BUSY_KEY, HOST, busy)
    client.set(affinity.conversation_key(job), HOST)


def test_the_next_turn_goes_to_the_worker_holding_the_conversation_while_it_has_room(
    client: redis.Redis, client_app: Celery
) -> None:
    first = turn("key-a", "Tell me about owls.")
    a_worker_holds(client, first)
    # The next turn (same sender, same first message) goes to that worker's own queue, a
    # person's message to its fast lane; another conversation goes to the shared queue.
    nxt = turn("key-a", "Tell me about owls.", "And their eyes?")
    sms = turn("+15550009", "Hi", channel="sms")
    other = turn("key-a", "Tell me about cats.")
    client.set(affinity.conversation_key(sms), HOST)
    for job in (nxt, sms, other):
        submit(client_app, job, client=client)
    assert where(client, nxt) == [worker_queue(HOST)]
    assert where(client, sms) == [worker_queue(HOST) + ".interactive"]
    assert where(client, other) == ["inference"]
    # Ledgered for the shared queue: if that worker dies first, the sweep sends it there.
    entry = json.loads(cast(bytes, client.hget(LEDGER_KEY, nxt.id)))
    assert entry["queue"] == "inference"


def test_a_worker_gone_or_without_room_is_passed_over(
    client: redis.Redis, client_app: Celery
) -> None:
    job = turn("key-b", "Plan a trip.", "To Rome?")
    a_worker_holds(client, job, busy=2)  # its 2 main slots busy: a normal job goes elsewhere
    submit(client_app, job, client=client)
    assert where(client, job) == ["inference"]
    person = turn("+15550010", "Hi", "again", channel="sms")
    a_worker_holds(client, person, busy=2)  # ... but its fast lane has room for a person
    submit(client_app, person, client=client)
    assert where(client, person) == [worker_queue(HOST) + ".interactive"]
    full = turn("+15550011", "Hi", "again", channel="sms")
    a_worker_holds(client, full, busy=3)
    submit(client_app, full, client=client)
    assert where(client, full) == ["inference.interactive"]
    batch = turn("key-g", "Plan a trip.", "To Lima?", priority="bulk")
    a_worker_holds(client, batch)  # bulk waits where any worker can take it
    submit(client_app, batch, client=client)
    assert where(client, batch) == ["inference\x06\x169"]
    gone = turn("key-c", "Plan a trip.", "To Oslo?")
    a_worker_holds(client, gone, beat=time.time() - 3600)
    submit(client_app, gone, client=client)
    assert where(client, gone) == ["inference"]
    # A request for a model: only to a worker serving that model.
    wrong = turn("key-d", "Hello", "there")
    a_worker_holds(client, wrong, model="another")
    submit(client_app, wrong, queue=model_queue("m"), client=client)
    assert where(client, wrong) == [model_queue("m")]


def test_a_job_sent_to_a_worker_that_died_is_sent_to_the_shared_queue(
    client: redis.Redis, client_app: Celery
) -> None:
    job = turn("key-e", "Tell me a joke.", "Another one?")
    a_worker_holds(client, job)
    submit(client_app, job, client=client)
    assert where(client, job) == [worker_queue(HOST)]

    def sweeps() -> list[str]:
        resent: list[str] = []
        for _ in range(2):
            client.delete(LEDGER_LOCK_KEY)
            resent += ledger.sweep(client_app, client, grace=30, recheck=0.0)
        return resent

    # Waiting in a live worker's own queue, it is not lost: nothing is sent again.
    entry = json.loads(cast(bytes, client.hget(LEDGER_KEY, job.id)))
    client.hset(LEDGER_KEY, job.id, json.dumps(dict(entry, at=time.time() - 60)))  # sweepable
    assert sweeps() == []
    # The worker is never seen again: the sweeps send the job to the shared queue.
    client.zadd(INFERENCE_LIVE_KEY, {HOST: time.time() - 3600})
    assert sweeps() == [job.id]
    assert "inference" in where(client, job)


@pytest.mark.model
def test_a_batched_worker_answers_the_turns_of_the_conversations_it_holds(
    client: redis.Redis, client_app: Celery, db_url: str, state_dir: Path
) -> None:
    env = base_env(state_dir, redis_url=db_url, engine="llama", n_ctx="1024",
                   parallel="2", priority_slots="1")  # fmt: skip
    worker = start_worker(env, "holder@test", timeout=180)
    try:
        first = turn("key-f", "What is the capital of France?")
        submit(client_app, first, client=client)
        reply = wait_for_reply(client_app, first.id, timeout=60)
        assert reply.worker == "holder@test"
        wait_for(lambda: client.get(affinity.conversation_key(first)) == b"holder@test", 10,
                 "the worker to remember the conversation")  # fmt: skip
        # Sent to this worker's own queue (it has room): answered only if it consumes it.
        nxt = turn("key-f", "What is the capital of France?", "And of Italy?")
        submit(client_app, nxt, client=client)
        assert wait_for_reply(client_app, nxt.id, timeout=60).worker == "holder@test"
        wait_for(lambda: affinity.busy(client, "holder@test") == 0, 10, "its jobs counted done")
    finally:
        stop_process(worker)
