"""A ledger of every job and delivery until its task has run, so a Redis crash loses none.

kombu's Redis transport takes a message off its queue with ``BRPOP`` and
records it as unacknowledged in a second command. A Redis crash between the
two (a window of a millisecond, but real under load) leaves the message in
neither place: after the restart nobody has it and nobody will answer. Late
acknowledgement cannot help, the message is simply gone.

So every inference job and every delivery is written to a ledger (task id ->
how to send it again) *before* it is queued, and struck off when its task has
run (success or final failure). One worker at a time sweeps the ledger: an
entry older than a grace period whose task is neither in its queue nor held
unacknowledged by a worker, in two sweeps in a row, is sent again with the
same task id. Everything downstream is idempotent per job, so a message that
only *looked* lost (a worker still running it from memory) costs a second
generation, never a second answer.

Cost: one HSET per job and one HDEL when it is done; the sweep reads the
queues of old entries in one Lua script (O(queued messages)), at most once per
sweep interval across all workers.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import kombu.exceptions
import redis
import redis.exceptions
from celery import Celery
from redis.client import Pipeline

from kernel.contract import worker_of
from kernel.keys import (
    INFERENCE_LIVE_KEY,
    LEDGER_KEY,
    LEDGER_LOCK_KEY,
    LEDGER_MISSING_KEY,
    RESULT_KEY_PREFIX,
    UNACKED_KEY,
    queue_keys,
)

log = logging.getLogger(__name__)

FINAL_STATES = {"SUCCESS", "FAILURE", "REVOKED"}
# A message lost three times is not lost by accident: stop and say so.
MAX_RESENDS = 3
# What a task raises when Redis is unreachable or still loading its data
# (BusyLoadingError is a ConnectionError): no fault of the job, so not its end.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)

# Which of the candidate task ids are in none of the queues (KEYS but the last)
# nor in the unacked hash (the last KEY). Atomic: no message can move between
# the two reads while the script runs. Celery puts the task id in the
# message's correlation_id, both in the queue and in the unacked record.
_FIND_MISSING = """
local wanted = {}
for _, id in ipairs(ARGV) do wanted[id] = true end
local function seen(message)
  local id = string.match(message, '"correlation_id": "([^"]*)"')
  if id then wanted[id] = nil end
end
for i = 1, #KEYS - 1 do
  for _, message in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do seen(message) end
end
for _, message in ipairs(redis.call('HVALS', KEYS[#KEYS])) do seen(message) end
local missing = {}
for id in pairs(wanted) do missing[#missing + 1] = id end
return missing
"""


def send(
    app: Celery,
    client: redis.Redis,
    name: str,
    args: list[Any],
    queue: str,
    *,
    task_id: str | None = None,
    along: Callable[[Pipeline], object] | None = None,
    resend_to: str | None = None,
    **options: Any,
) -> str:
    """Write the task to the ledger, then queue it on `queue`; return its id. Raises on
    Redis errors.

    `along` adds writes of the caller's to the ledger's round trip (their own failures
    are not the ledger's). `resend_to`: the queue where the sweep looks for the task and
    sends it again if lost (default `queue`). Events and dashboards show the task's
    arguments as a summary (`workers.privacy`)."""
    task_id = task_id or str(uuid.uuid4())
    entry = {"name": name, "args": args, "queue": resend_to or queue, "at": time.time(),
             "resent": 0}  # fmt: skip
    if resend_to and resend_to != queue:
        entry["routed"] = queue  # where it waits meanwhile: the sweep looks there too
    if options.get("priority") is not None:  # a Celery message priority, kept on a resend
        entry["priority"] = options["priority"]
    pipe = client.pipeline(transaction=False)
    pipe.hset(LEDGER_KEY, task_id, json.dumps(entry))
    if along is not None:
        along(pipe)
    written = pipe.execute(raise_on_error=False)[0]
    if isinstance(written, Exception):
        raise written
    app.send_task(name, args=args, task_id=task_id, queue=queue, **options)
    return task_id


def expect(
    client: redis.Redis,
    task_id: str,
    name: str,
    args: list[Any],
    queue: str,
    *,
    within: float,
) -> None:
    """Rewrite `task_id`'s entry: a task of that id will run on `queue` within `within`
    seconds; if none has by then (its chain was lost), send `name(args)` in its place.

    For a job handed over to a helper: the continuation that answers it runs later under
    the job's id, and this fallback answers it if the helper's message is lost."""
    entry = {"name": name, "args": args, "queue": queue, "at": time.time() + within,
             "resent": 0}  # fmt: skip
    pipe = client.pipeline(transaction=False)
    pipe.hset(LEDGER_KEY, task_id, json.dumps(entry))
    pipe.hdel(LEDGER_MISSING_KEY, task_id)
    pipe.execute()


def strike(client: redis.Redis, task_id: str) -> None:
    """The task has run: forget it."""
    pipe = client.pipeline(transaction=False)
    pipe.hdel(LEDGER_KEY, task_id)
    pipe.hdel(LEDGER_MISSING_KEY, task_id)
    pipe.execute()


def is_outage(error: object) -> bool:
    """Whether a task failed because Redis was unreachable (not because of its job)."""
    return isinstance(error, OUTAGE_ERRORS)


def _failed_on_outage(meta: dict[str, Any]) -> bool:
    result = meta.get("result")
    if meta.get("status") != "FAILURE" or not isinstance(result, dict):
        return False
    module = {"redis.exceptions": redis.exceptions, "kombu.exceptions": kombu.exceptions}.get(
        str(result.get("exc_module"))
    )
    kind = getattr(module, str(result.get("exc_type")), None)
    return isinstance(kind, type) and issubclass(kind, OUTAGE_ERRORS)


def finished(client: redis.Redis, task_ids: list[str]) -> set[str]:
    """Which of these tasks have a final result stored (ran, but were not struck off).

    A failure caused by a Redis outage is not final: the task is sent again."""
    metas = cast(list[bytes | None], client.mget([RESULT_KEY_PREFIX + t for t in task_ids]))
    done = set()
    for task_id, raw in zip(task_ids, metas, strict=True):
        meta = json.loads(raw) if raw is not None else {}
        if meta.get("status") in FINAL_STATES and not _failed_on_outage(meta):
            done.add(task_id)
    return done


def sweep(
    app: Celery, client: redis.Redis, grace: float, recheck: float, owner: str = "sweep"
) -> list[str]:
    """Send again the tasks lost from Redis; return their ids.

    An entry is examined once it is `grace` seconds old, and sent again when two
    sweeps at least `recheck` seconds apart found it nowhere. Only one process
    sweeps per `recheck` interval (a lock in Redis).
    """
    if not client.set(LEDGER_LOCK_KEY, owner, nx=True, px=max(1, int(recheck * 1000))):
        return []
    now = time.time()
    old: dict[str, dict[str, Any]] = {}
    for raw_id, raw_entry in cast(dict[bytes, bytes], client.hgetall(LEDGER_KEY)).items():
        entry = json.loads(raw_entry)
        if now - float(entry["at"]) >= grace:
            old[raw_id.decode()] = entry
    raw_missing = cast(dict[bytes, bytes], client.hgetall(LEDGER_MISSING_KEY))
    seen_missing = {k.decode(): float(v) for k, v in raw_missing.items()}
    missing: set[str] = set()
    if old:
        # A job routed to one worker's own queue waits there while that worker is alive;
        # once it is not, the job counts as lost, and is sent to the shared queue.
        live = {h.decode() for h in cast(list[bytes], client.zrangebyscore(
            INFERENCE_LIVE_KEY, now - grace, "+inf"))}  # fmt: skip
        routed = {e["routed"] for e in old.values()
                  if e.get("routed") and worker_of(e["routed"]) in live}  # fmt: skip
        queues = sorted({e["queue"] for e in old.values()} | routed)
        keys = [*(key for queue in queues for key in queue_keys(queue)), UNACKED_KEY]
        found = client.eval(_FIND_MISSING, len(keys), *keys, *old)
        missing = {m.decode() if isinstance(m, bytes) else str(m) for m in cast(list[Any], found)}
    reappeared = [t for t in seen_missing if t not in missing]
    if reappeared:
        client.hdel(LEDGER_MISSING_KEY, *reappeared)
    if not missing:
        return []
    done = finished(client, sorted(missing))
    for task_id in done:
        strike(client, task_id)
    resent = []
    for task_id in sorted(missing - done):
        first_missing = seen_missing.get(task_id)
        if first_missing is None:
            client.hset(LEDGER_MISSING_KEY, task_id, str(now))
        elif now - first_missing >= recheck and _resend(app, client, task_id, old[task_id]):
            resent.append(task_id)
    return resent


def _resend(app: Celery, client: redis.Redis, task_id: str, entry: dict[str, Any]) -> bool:
    if not client.hexists(LEDGER_KEY, task_id):  # it ran meanwhile
        client.hdel(LEDGER_MISSING_KEY, task_id)
        return False
    if entry.get("resent", 0) >= MAX_RESENDS:
        log.error("task %s (%s) lost %d times; giving up on it", task_id, entry["name"],
                  entry["resent"])  # fmt: skip
        strike(client, task_id)
        return False
    entry = dict(entry, at=time.time(), resent=entry.get("resent", 0) + 1)
    client.hset(LEDGER_KEY, task_id, json.dumps(entry))
    client.hdel(LEDGER_MISSING_KEY, task_id)
    app.send_task(entry["name"], args=entry["args"], task_id=task_id, queue=entry["queue"],
                  priority=entry.get("priority"))  # fmt: skip
    log.warning("task %s (%s) was lost from Redis; sent again", task_id, entry["name"])
    return True


def settle(client: redis.Redis, task_id: str, state: str | None, retval: object = None) -> None:
    """Strike a task that has run to its end (or was revoked: `state` REVOKED) off the
    ledger; keep one that failed on a Redis outage, so that the sweep sends it again."""
    # RETRY leaves the entry: the retry is the same task id, queued again.
    if state == "FAILURE" and is_outage(retval):
        # E.g. a job answered while Redis restarted could not hand its reply on: its
        # message is acknowledged and gone, so the ledger must send it again.
        log.warning("task %s failed on a Redis outage; it will be sent again", task_id)
        return
    if state in FINAL_STATES:
        try:
            strike(client, task_id)
        except redis.RedisError as error:
            # The sweep finds its result and strikes it then.
            log.warning("ledger entry of %s kept (%s)", task_id, error.__class__.__name__)
