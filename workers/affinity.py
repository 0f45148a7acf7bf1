"""Conversation affinity: a conversation's next turn goes to the worker that holds its prefix.

A batched worker keeps each slot's tokens in its KV cache, so the next turn of a
conversation it answered costs only the new tokens there, and all of them anywhere else.
With several workers, the job would land on any of them. So:

- when a batched worker has answered a job, it remembers for the job's conversation
  (its channel, sender and first message: a digest, never the text) that it holds it,
  for AFFINITY_TTL_S;
- each batched worker also consumes a queue of its own, `inference.worker.<hostname>`
  (and its fast lane), and keeps in Redis how many jobs it holds and how many slots it has;
- `route` sends a job whose conversation a live worker holds to that worker's own queue,
  unless the worker is gone or busy (no slot free for the job's priority): then the job
  goes to its shared queue, as any other.

Nothing is lost when the chosen worker dies before taking the job: the job's ledger
entry names the shared queue, where the sweep does not find it, so it is sent there again
(`workers.ledger`); a later second copy costs a generation, never a second answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from typing import cast

import redis
import redis.exceptions
from redis.client import Pipeline

from kernel.contract import INFERENCE_QUEUE, Job, Priority, model_queue, queue_for, worker_queue
from kernel.keys import (
    AFFINITY_PREFIX,
    INFERENCE_BUSY_KEY,
    INFERENCE_LIVE_KEY,
    INFERENCE_MODELS_KEY,
    INFERENCE_SLOTS_KEY,
)

log = logging.getLogger(__name__)

# How long a worker is remembered as holding a conversation (a slot's cache lasts until
# another job takes the slot; a person's next message usually comes within minutes).
AFFINITY_TTL_S = 600

# The worker holding conversation KEYS[1], if it beat since ARGV[1], serves model ARGV[3]
# (when one is named) and holds fewer jobs than ARGV[2] allows ("all": every slot, fast
# lane included; "main": its main slots).
_TARGET = """
local host = redis.call('GET', KEYS[1])
if not host then return false end
local beat = redis.call('ZSCORE', KEYS[2], host)
if not beat or tonumber(beat) < tonumber(ARGV[1]) then return false end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[5], host) ~= ARGV[3] then return false end
local slots = redis.call('HGET', KEYS[4], host)
if not slots then return false end
local main, lane = string.match(slots, '^(%d+),(%d+)$')
local room = tonumber(main)
if ARGV[2] == 'all' then room = room + tonumber(lane) end
local busy = tonumber(redis.call('HGET', KEYS[3], host) or '0')
if busy >= room then return false end
return host
"""


def conversation_key(job: Job) -> str:
    """The Redis key naming `job`'s conversation: its channel, sender and first message of
    the user's (a system message is the same in every conversation of an API client)."""
    users = [m for m in job.messages if m.role == "user"] or job.messages
    first = users[0].content[:2048]
    digest = hashlib.sha256(f"{job.channel}\0{job.user}\0{first}".encode()).hexdigest()[:24]
    return AFFINITY_PREFIX + digest


def routable(queue: str) -> str | None:
    """Whether a job for `queue` may go to the worker holding its conversation: for the
    shared queue, "" (any model); for a model's queue, that model; else (a pinned GPU's
    queue) None."""
    if queue == INFERENCE_QUEUE:
        return ""
    prefix = model_queue("")
    return queue.removeprefix(prefix) if queue.startswith(prefix) else None


_TARGET_SHA = hashlib.sha1(_TARGET.encode(), usedforsecurity=False).hexdigest()  # Redis's name


class Question:
    """Which live worker with room for a job of `priority`, serving `model` (any when ""),
    holds `job`'s conversation: asked in the caller's round trip, by the script's digest."""

    def __init__(self, job: Job, model: str, priority: Priority, heartbeat_ttl: float) -> None:
        self.keys = [conversation_key(job), INFERENCE_LIVE_KEY, INFERENCE_BUSY_KEY,
                     INFERENCE_SLOTS_KEY, INFERENCE_MODELS_KEY]  # fmt: skip
        room = "all" if priority == "interactive" else "main"
        self.args: list[str | float] = [time.time() - heartbeat_ttl, room, model]

    def ask(self, pipe: Pipeline) -> None:
        """Queue the question on `pipe` (executed with ``raise_on_error=False``)."""
        pipe.evalsha(_TARGET_SHA, len(self.keys), *self.keys, *self.args)

    def answer(self, client: redis.Redis, answer: object) -> str | None:
        """The hostname the answer names, or None. Redis that does not know the script yet
        (first use, or a restart) is taught it and asked again."""
        if isinstance(answer, redis.exceptions.NoScriptError):
            client.script_load(_TARGET)
            answer = client.evalsha(_TARGET_SHA, len(self.keys), *self.keys, *self.args)
        elif isinstance(answer, Exception):
            raise answer
        if isinstance(answer, bytes):
            return answer.decode()
        return answer if isinstance(answer, str) else None


def routed(queue: str, host: str | None, priority: Priority) -> str:
    """The queue a job for `queue` is sent to: the fast lane or the queue itself, of the
    worker holding its conversation when there is one (`host`), else of `queue`."""
    return queue_for(worker_queue(host) if host else queue, priority)


def remember(pipe: Pipeline, job: Job, hostname: str) -> None:
    """Queue on `pipe`: `hostname` holds `job`'s conversation now."""
    pipe.set(conversation_key(job), hostname, ex=AFFINITY_TTL_S)


class HeldJobs:
    """How many jobs this worker holds, counted in the process and written to Redis by a
    thread of its own: the count moves with every job, and no job waits for the write."""

    def __init__(self, client: redis.Redis, hostname: str, main: int, lane: int) -> None:
        self.client, self.hostname = client, hostname
        self.slots = f"{main},{lane}"
        self.held: set[str] = set()  # task ids: a job revoked before it came counts nothing
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="held-jobs", daemon=True)

    def start(self) -> None:
        """Say the worker's slots, with none held (Redis errors raise), then keep it told."""
        self._write()
        self._thread.start()

    def took(self, task_id: str) -> None:
        """The worker took task `task_id`."""
        with self._lock:
            self.held.add(task_id)
        self._changed.set()

    def done(self, task_id: str) -> None:
        """Task `task_id` ended (or was revoked) here."""
        with self._lock:
            self.held.discard(task_id)
        self._changed.set()

    def stop(self) -> None:
        """Stop writing and take this worker out of the routing (it is shutting down: it
        takes no more jobs, so none should be sent its way)."""
        self._stop.set()
        self._changed.set()
        self._thread.join(5)
        with contextlib.suppress(redis.RedisError):
            pipe = self.client.pipeline(transaction=False)
            pipe.hdel(INFERENCE_SLOTS_KEY, self.hostname)
            pipe.hdel(INFERENCE_BUSY_KEY, self.hostname)
            pipe.execute()

    def _write(self) -> None:
        with self._lock:
            held = len(self.held)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(INFERENCE_SLOTS_KEY, self.hostname, self.slots)
        pipe.hset(INFERENCE_BUSY_KEY, self.hostname, str(held))
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.wait(5.0)  # and every 5 s regardless (Redis may have restarted)
            self._changed.clear()
            if self._stop.is_set():
                return
            try:
                self._write()
            except redis.RedisError as error:
                log.debug("held jobs not written (%s)", error.__class__.__name__)


def busy(client: redis.Redis, hostname: str) -> int:
    """How many jobs `hostname` holds, as last counted."""
    return int(cast(bytes | None, client.hget(INFERENCE_BUSY_KEY, hostname)) or 0)
