"""`locate_jobs` (behind `gpt4people status --job`) on a real Redis holding junk and a backlog."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from gpt4people.redis_server import RedisServer
from gpt4people.whereabouts import QUEUE_PAGE, locate_jobs
from kernel.keys import LEDGER_KEY, LEDGER_MISSING_KEY, RESULT_KEY_PREFIX, UNACKED_KEY
from kernel.redis_client import redis_client
from tests.conftest import redis_url

DB_WHEREABOUTS = 13


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_client(redis_url(redis_server, DB_WHEREABOUTS), socket_timeout=5) as client:
        client.flushdb()
        yield client
        client.flushdb()


def message(task_id: str) -> str:
    """A queued Celery message as kombu writes it (only what is read here)."""
    return json.dumps({"body": "", "properties": {"correlation_id": task_id}, "headers": {}})


def test_a_job_behind_a_long_backlog_is_found(client: redis.Redis) -> None:
    backlog = [message(f"other-{i}") for i in range(QUEUE_PAGE * 2 + 5)]
    client.rpush("inference", *backlog, message("late-one"))
    where = locate_jobs(client, ["late-one"])["late-one"]
    assert where.inference.queued_in == ["inference"]


def test_junk_in_redis_is_skipped_not_a_traceback(client: redis.Redis) -> None:
    # Anything may be in a shared Redis: other software's keys, a corrupt or truncated
    # record, a hand edit. The operator asking "where is my message?" still gets an answer.
    client.rpush("inference", b"\xff\xfe not json", json.dumps([1, 2]),
                 json.dumps({"properties": "a string"}), json.dumps({"properties": None}),
                 message("job-1"))  # fmt: skip
    client.hset(UNACKED_KEY, mapping={b"\xff": json.dumps([{"properties": [1]}]),
                                      "tag-2": json.dumps([]), "tag-3": "{"})  # fmt: skip
    client.hset(LEDGER_KEY, mapping={"job-1": "not json", "job-2": json.dumps({"at": "x"})})
    client.hset(LEDGER_MISSING_KEY, "job-2", "yesterday")
    client.set(RESULT_KEY_PREFIX + "job-1", json.dumps(["not", "a", "dict"]))
    client.set(RESULT_KEY_PREFIX + "job-2", b"\x00\x01")
    found = locate_jobs(client, ["job-1", "job-2"])
    assert found["job-1"].inference.queued_in == ["inference"]
    assert found["job-1"].inference.result == "unreadable"
    assert found["job-2"].inference.result == "unreadable"
    assert found["job-2"].inference.ledgered_s is None
    assert "job-2: inference: result unreadable" in found["job-2"].describe()
