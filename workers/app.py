"""The Celery application shared by every GPT4People process."""

from __future__ import annotations

import logging
import os
import threading

import redis
from celery import Celery, current_task
from celery.signals import after_setup_logger, after_setup_task_logger

from kernel.logs import configure_handler, use_task_lookup
from kernel.redis_client import celery_transport_options, redis_client, resolve_redis_url
from kernel.settings import Settings, get_settings
from workers.commandline import is_inference_worker
from workers.privacy import APP_OPTIONS  # task arguments shown as summaries only

app = Celery("gpt4people", **APP_OPTIONS)
app.config_from_object("celeryconfig")
if is_inference_worker():
    # Take jobs from the queues in the order the worker lists them, fast lanes first
    # (kombu's default turns the list round at each fetch).
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         "queue_order_strategy": "priority"}  # fmt: skip


def _running_task() -> tuple[str | None, str | None]:
    """The id and name of the Celery task this thread runs, for log records."""
    task = current_task._get_current_object() if current_task else None
    if task is None:
        return None, None
    return (str(task.request.id) if task.request.id else None), task.name


use_task_lookup(_running_task)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _structured_logs(logger: logging.Logger, **_: object) -> None:
    # Celery sets up its own handlers in workers; give them our format and job ids.
    for handler in logger.handlers:
        configure_handler(handler, get_settings().log_format)


_broker_client: redis.Redis | None = None
_broker_client_lock = threading.Lock()
_inherited_clients: list[redis.Redis] = []


def broker_redis() -> redis.Redis:
    """This process's client of the broker's Redis, for GPT4People's own records.

    One thread-safe connection pool per process, shared by heartbeats, recovery,
    metrics, streaming and deliveries. A forked pool process makes its own and
    never touches the one it inherited: redis-py resets an inherited pool under
    the pool's lock, and a thread of the parent (heartbeats, recovery) may have
    held that lock at the instant of the fork, so the child would wait for it
    forever (seen: a replacement pool process, forked after its predecessor was
    killed, hung before its first job).
    """
    global _broker_client
    with _broker_client_lock:
        if _broker_client is None:
            _broker_client = redis_client(
                str(app.conf.broker_url), socket_timeout=10, socket_connect_timeout=5
            )
        return _broker_client


def _forget_inherited_client() -> None:
    global _broker_client, _broker_client_lock
    if _broker_client is not None:
        # Kept referenced: closing it, or letting it be collected, would take its locks.
        _inherited_clients.append(_broker_client)
    _broker_client, _broker_client_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_inherited_client)


def celery_for(settings: Settings) -> Celery:
    """A client-side Celery app (same configuration) talking to the Redis of `settings`."""
    client = Celery("gpt4people", set_as_current=False, **APP_OPTIONS)
    client.config_from_object("celeryconfig")
    url = resolve_redis_url(settings)
    sentinel = celery_transport_options(url, settings)
    # A channel publishes a job in milliseconds; a broker gone silent must fail the
    # publish in seconds (the SMS webhook then spools), not hang it.
    publish_timeouts = {"socket_timeout": 3, "socket_connect_timeout": 2}
    client.conf.update(
        broker_url=url,
        result_backend=url,
        broker_transport_options={
            **client.conf.broker_transport_options,
            **sentinel,
            **publish_timeouts,
        },
        # A channel waiting on Redis must answer its caller quickly (503), not retry
        # for the 20 s a worker storing a result is allowed.
        result_backend_transport_options={
            **client.conf.result_backend_transport_options,
            **sentinel,
            "retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        },
    )
    return client
