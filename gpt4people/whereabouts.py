"""Where a job is right now: queued, held by a worker, ledgered, answered, delivered.

`gpt4people status --job ID` and the reliability tests ask this when a
message seems late or lost. Everything is read from Redis as Celery, kombu
and GPT4People leave it: the queues (lists), kombu's ``unacked`` hash of
messages workers hold, the recovery records of which worker instance holds
which delivery tag, the ledger of sent tasks, and the stored results. A job's
reply to a channel that answers later is its own task, ``<job id>.deliver``.

Reading is O(queued + held messages), a thousand queued messages per round
trip: fine for an operator or a test, not for a hot path. Entries are read as
untrusted: one that is not what Celery writes is skipped, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from gpt4people.status import queue_depths
from kernel.keys import (
    LEDGER_KEY,
    LEDGER_MISSING_KEY,
    RECOVERY_INSTANCES_KEY,
    RECOVERY_OWNERS_KEY,
    RESULT_KEY_PREFIX,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    queue_keys,
)

DELIVERY_SUFFIX = ".deliver"
QUEUE_PAGE = 1000  # queued messages read per LRANGE, so a long backlog never blocks Redis


@dataclass
class TaskWhereabouts:
    """What Redis knows of one task (a job's inference or its delivery)."""

    task_id: str
    queued_in: list[str] = field(default_factory=list)
    held_by: str | None = None  # a worker instance, with its heartbeat age
    held_for_s: float | None = None
    ledgered_s: float | None = None  # how long ago it was (last) sent, if in the ledger
    resent: int = 0
    missing_since_s: float | None = None
    result: str | None = None  # Celery state, with the delivery status when there is one

    def found(self) -> bool:
        """Whether Redis knows of the task at all."""
        return bool(self.queued_in or self.held_by or self.ledgered_s is not None or self.result)

    def describe(self) -> str:
        """One line a person can read."""
        facts = [f"queued in {q}" for q in self.queued_in]
        if self.held_by is not None:
            facts.append(f"held by {self.held_by} for {self.held_for_s or 0:.1f}s")
        if self.ledgered_s is not None:
            again = f", sent again {self.resent}x" if self.resent else ""
            facts.append(f"ledgered {self.ledgered_s:.1f}s ago{again}")
        if self.missing_since_s is not None:
            facts.append(f"found nowhere by the sweep for {self.missing_since_s:.1f}s")
        if self.result is not None:
            facts.append(f"result {self.result}")
        return "; ".join(facts) or "unknown to Redis"


@dataclass
class JobWhereabouts:
    """A job's inference task and, for channels that answer later, its delivery task."""

    job_id: str
    inference: TaskWhereabouts
    delivery: TaskWhereabouts

    def describe(self) -> str:
        """Two facts a person can read."""
        return (
            f"{self.job_id}: inference: {self.inference.describe()} | "
            f"delivery: {self.delivery.describe()}"
        )


def _json(raw: bytes | str | None) -> Any:
    """`raw` decoded, or None when it is not JSON."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one too
        return None


def _correlation_id(raw: bytes | str) -> str | None:
    message = _json(raw)
    if isinstance(message, list):  # an unacked record: [message, exchange, routing key]
        message = message[0] if message else None
    properties = message.get("properties") if isinstance(message, dict) else None
    correlation = properties.get("correlation_id") if isinstance(properties, dict) else None
    return str(correlation) if correlation else None


def _queued(client: redis.Redis, queue: str) -> Iterator[bytes]:
    """The messages in `queue` (each priority's list: bulk jobs wait in their own), a page
    at a time."""
    for key in queue_keys(queue):
        start = 0
        while page := cast(list[bytes], client.lrange(key, start, start + QUEUE_PAGE - 1)):
            yield from page
            start += QUEUE_PAGE


def _ledgered(raw: bytes | None, now: float) -> tuple[float, int] | None:
    """How long ago a ledger entry was (last) sent, and how often it was sent again."""
    entry = _json(raw)
    try:
        return now - float(entry["at"]), int(entry.get("resent", 0))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def _result(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    meta = _json(raw)
    if not isinstance(meta, dict):
        return "unreadable"
    state = str(meta.get("status"))
    result = meta.get("result")
    if state == "SUCCESS" and isinstance(result, dict) and "status" in result:
        return f"{state} ({result['status']})"
    if state == "FAILURE" and isinstance(result, dict):
        return f"{state} ({result.get('exc_type')})"
    return state


def locate_tasks(client: redis.Redis, task_ids: Iterable[str]) -> dict[str, TaskWhereabouts]:
    """Where each of these tasks is, from one pass over the queues and held messages."""
    found = {task_id: TaskWhereabouts(task_id) for task_id in task_ids}
    now = time.time()
    for queue in queue_depths(client):
        for raw in _queued(client, queue):
            entry = found.get(_correlation_id(raw) or "")
            if entry is not None:
                entry.queued_in.append(queue)
    raw_owners = cast(dict[bytes, bytes], client.hgetall(RECOVERY_OWNERS_KEY))
    owners = {tag.decode(errors="replace"): owner.decode(errors="replace")
              for tag, owner in raw_owners.items()}  # fmt: skip
    instances = client.zrange(RECOVERY_INSTANCES_KEY, 0, -1, withscores=True)
    beats = dict(cast(list[tuple[bytes, float]], instances))
    for raw_tag, raw in cast(dict[bytes, bytes], client.hgetall(UNACKED_KEY)).items():
        entry = found.get(_correlation_id(raw) or "")
        if entry is None:
            continue
        tag = raw_tag.decode(errors="replace")
        owner = owners.get(tag)
        if owner is None:
            entry.held_by = "a worker that never recorded itself"
        else:
            beat = beats.get(owner.encode())
            age = f"heartbeat {now - beat:.1f}s ago" if beat else "no heartbeat"
            entry.held_by = f"{owner} ({age})"
        delivered = cast(float | None, client.zscore(UNACKED_INDEX_KEY, tag))
        entry.held_for_s = now - delivered if delivered else None
    ids = list(found)
    if not ids:
        return found
    pipe = client.pipeline(transaction=False)
    pipe.hmget(LEDGER_KEY, ids)
    pipe.hmget(LEDGER_MISSING_KEY, ids)
    pipe.mget([RESULT_KEY_PREFIX + t for t in ids])
    ledger, missing, results = cast(list[list[bytes | None]], pipe.execute())
    for task_id, entry_raw, missing_raw, result_raw in zip(
        ids, ledger, missing, results, strict=True
    ):
        entry = found[task_id]
        ledgered = _ledgered(entry_raw, now)  # its arguments (the conversation) stay out
        if ledgered is not None:
            entry.ledgered_s, entry.resent = ledgered
        with contextlib.suppress(TypeError, ValueError):
            entry.missing_since_s = now - float(missing_raw) if missing_raw else None
        entry.result = _result(result_raw)
    return found


def locate_jobs(client: redis.Redis, job_ids: Iterable[str]) -> dict[str, JobWhereabouts]:
    """Where each job's inference and delivery are."""
    job_ids = list(job_ids)
    tasks = locate_tasks(client, [*job_ids, *(j + DELIVERY_SUFFIX for j in job_ids)])
    return {j: JobWhereabouts(j, tasks[j], tasks[j + DELIVERY_SUFFIX]) for j in job_ids}
