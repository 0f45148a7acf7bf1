"""Every name the kernel, the runtime and the operator tools use in Redis: ours, and kombu's.

Ours start with ``gpt4p:``. They outlive a deploy (Redis keeps them across an
upgrade), so a name here never changes lightly: a renamed key silently forgets
what it held. Channel-private state (SMS conversations, outbound caps, email
intake, HTTP request bodies) keeps its prefix in its channel's module, since
nothing else reads it.

The rest are not ours: kombu's Redis transport and Celery's Redis result
backend choose them. We must know them because the dead-worker reaper
(`workers.recovery`), the ledger's sweep (`workers.ledger`) and `gpt4people
status --job` read the broker's state across processes (which messages are
held unacknowledged and since when, which queue lists hold what, which results
are stored), and no kombu API answers that. They are kombu's defaults:
celeryconfig sets no ``unacked_key``, ``sep`` or ``priority_steps``; a kombu
release that changed them would fail tests/reliability.
"""

from __future__ import annotations

# --- ours: the runtime --------------------------------------------------------------
# Sorted set: inference worker hostname -> last heartbeat (for /readyz, `status`).
INFERENCE_LIVE_KEY = "gpt4p:inference:live"
INFERENCE_MODELS_KEY = "gpt4p:inference:models"  # hash: hostname -> model it serves
# Hashes of batched workers: hostname -> jobs it holds now; hostname -> "main,lane" slots.
INFERENCE_BUSY_KEY = "gpt4p:inference:busy"
INFERENCE_SLOTS_KEY = "gpt4p:inference:slots"
# String per conversation (a digest): the batched worker holding its prefix in its cache.
AFFINITY_PREFIX = "gpt4p:affinity:"
# Sorted set: worker instance (hostname#run) -> last heartbeat, for the reaper.
RECOVERY_INSTANCES_KEY = "gpt4p:recovery:instances"
RECOVERY_OWNERS_KEY = "gpt4p:recovery:owners"  # hash: delivery tag -> instance holding it
LEDGER_KEY = "gpt4p:ledger"  # hash: task id -> JSON {name, args, queue, at, resent}
LEDGER_MISSING_KEY = "gpt4p:ledger:missing"  # hash: task id -> when a sweep found it nowhere
LEDGER_LOCK_KEY = "gpt4p:ledger:sweep"  # one sweeper at a time
# String per source message: <prefix><channel>:<source id> -> the job id it became.
IDEMPOTENCY_PREFIX = "gpt4p:idem:"
# Sorted set per sender (a digest of channel and sender): job id -> when it was submitted,
# for fair share (workers.fairshare).
INFLIGHT_PREFIX = "gpt4p:inflight:"
METRICS_PREFIX = "gpt4p:metrics:"
METRICS_COUNTERS_KEY = METRICS_PREFIX + "counters"
METRICS_GAUGES_KEY = METRICS_PREFIX + "gauges"
METRICS_HISTOGRAMS_KEY = METRICS_PREFIX + "histograms"  # set: the histogram keys below
METRICS_HISTOGRAM_PREFIX = METRICS_PREFIX + "h:"  # hash per metric and labels: its buckets
METRICS_QUEUES_KEY = METRICS_PREFIX + "queues"  # set: the queues whose depth a scrape reports
STREAM_PREFIX = "gpt4p:stream:"  # pub/sub channel per job: its text as it is generated
# Pub/sub channel published to just before WAIT: it makes WAIT cover every write so far,
# not only this connection's.
REPLICATION_MARK_CHANNEL = "gpt4p:replication:mark"

# --- ours: helpers --------------------------------------------------------------------
HELPERS_INDEX_KEY = "gpt4p:helpers"  # set: every helper name ever registered
HELPER_PREFIX = "gpt4p:helper:"
# Per sender and window: <prefix><sender>:<window>. Under HELPER_PREFIX, yet no helper's
# keys collide with it: theirs are <name> and <name>:live, never three parts.
HELPER_RATE_PREFIX = HELPER_PREFIX + "rate:"


def helper_key(name: str) -> str:
    """The hash describing helper `name`."""
    return HELPER_PREFIX + name


def helper_live_key(name: str) -> str:
    """The sorted set of helper `name`'s instances -> their last heartbeat."""
    return f"{HELPER_PREFIX}{name}:live"


# --- kombu's Redis transport ----------------------------------------------------------
# A queue is a list named after it; a message of priority 3, 6 or 9 waits in a list of
# its own, <queue><separator><step> (priority 0 in the queue's own list).
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
# Hash: delivery tag -> [message, exchange, routing key] of each message a consumer holds
# unacknowledged; and a sorted set of the same tags by when each was delivered.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def queue_keys(queue: str) -> list[str]:
    """The lists where kombu keeps `queue`'s waiting messages, every priority's."""
    return [queue, *(f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS)]


# --- Celery's Redis result backend ----------------------------------------------------
# A task's result is stored under this prefix plus its id, and published on a pub/sub
# channel of the same name: waiting on the channel answers without polling.
RESULT_KEY_PREFIX = "celery-task-meta-"
