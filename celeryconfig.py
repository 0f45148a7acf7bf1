"""Celery settings for every GPT4People process, read with ``app.config_from_object``.

Each reliability setting says which failure it covers. Values that operators
tune come from `kernel.settings` (GPT4P_*), never from a second place.
"""

from kombu import Queue

from kernel.channels import delivered_channels
from kernel.contract import (
    INFERENCE_QUEUE,
    INFERENCE_TASK,
)
from kernel.redis_client import celery_transport_options, resolve_redis_url
from kernel.settings import get_settings

_settings = get_settings()

broker_url = resolve_redis_url(_settings)
result_backend = broker_url

# JSON only: a pickled message from anyone who can write to Redis would run code.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

task_queues = [Queue(INFERENCE_QUEUE, routing_key=INFERENCE_QUEUE)]
task_default_queue = INFERENCE_QUEUE
task_routes = {
    INFERENCE_TASK: {"queue": INFERENCE_QUEUE},
    **{c.delivery_task: {"queue": c.delivery_queue} for c in delivered_channels()},
}
# Every worker has the same lifecycle (workers.lifecycle) and knows the delivery tasks;
# which queues it consumes decides what it runs.
imports = (
    "workers.lifecycle",
    "workers.tasks",
    *(f"channels.{c.name}.delivery" for c in delivered_channels()),
)

# Acknowledge after the answer exists, not on receipt: a worker that dies
# mid-generation leaves the job in Redis for another worker instead of losing it.
task_acks_late = True
# ... and when the pool process is killed (segfault in llama.cpp, OOM killer),
# put the job back rather than failing it.
task_reject_on_worker_lost = True
# One job reserved per process: a long generation must not hold jobs hostage
# that an idle worker elsewhere could answer now.
worker_prefetch_multiplier = 1

# A generation that runs away is asked to stop (soft), then its process is killed (hard).
task_soft_time_limit = _settings.task_soft_time_limit
task_time_limit = _settings.task_time_limit
# Redis redelivers an unacknowledged job after this many seconds; it must be
# longer than the longest task, or a slow answer would be generated twice.
# With a sentinel:// URL both also get the primary's name and the Sentinels' password.
broker_transport_options = {
    "visibility_timeout": max(3600, 2 * _settings.task_time_limit),
    **celery_transport_options(broker_url, _settings),
}
result_backend_transport_options = {
    "visibility_timeout": max(3600, 2 * _settings.task_time_limit),
    **celery_transport_options(result_backend, _settings),
}
# Results are read once by the channel that waits for them; keep them for a day at most.
# A helper called for a job stores none (its value rides in its continuation's message,
# deleted when read: workers.handover), so no picture waits here for a day.
result_expires = 24 * 3600
# A stored result carries no task arguments (prompts, numbers, addresses): nothing reads
# them there, and Flower shows the summaries of the task events (workers.privacy).
result_extended = False

# Operators may replace pool processes (`celery control pool_restart`) to reload a model.
worker_pool_restarts = True
# Loading a model in a fresh pool process takes longer than Celery's 4 s default.
worker_proc_alive_timeout = 180.0
# Keep trying to reach Redis at start-up and after outages instead of exiting, for as
# long as the outage lasts (Celery's default gives up after 100 tries).
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
# Kombu's cleanup of a lost Redis connection can raise and end the worker
# (celery/kombu#970): this consumer finishes it and reconnects instead.
worker_consumer = "workers.consumer:SelfHealingConsumer"
# A job still running when the connection breaks is left to finish (its answer is
# delivered once); its message, which can no longer be acknowledged, is returned by the
# reaper and answered again, deduplicated. Cancelling would kill a send half-way.
worker_cancel_long_running_tasks_on_connection_loss = False
broker_connection_timeout = 5.0
redis_socket_connect_timeout = 5.0
redis_socket_timeout = 30.0
redis_retry_on_timeout = True
broker_heartbeat = 0

# Events for Flower and `celery events`: a job appears there when a worker receives it.
# Not sent: a "sent" event (one more Redis round trip on every channel's request; queued
# jobs are counted in /metrics' gpt4p_queue_depth and Flower's Broker page) and a STARTED
# record in the result backend (one more write per job, which woke every waiting caller
# for nothing; `gpt4people status --job` shows which worker holds a job).
worker_send_task_events = True
task_send_sent_event = False
task_track_started = False

enable_utc = True
timezone = "UTC"
