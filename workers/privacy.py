"""Keeping people's messages, numbers and addresses out of logs, monitoring and results.

Celery logs a task's return value on success, shows its arguments in events
(Flower, ``celery events``) and in ``inspect active/reserved/scheduled``, and
can store them with results. Ours carry prompts, replies, phone numbers and
addresses, so:

- the success line drops the value;
- every task message, first try or retry, from whichever process sends it,
  shows a summary naming the job, never its content. `PrivateAMQP` writes it
  where Celery builds the message, for its headers and its ``task-sent`` event
  alike (``self.retry()`` builds a new message without the caller's
  ``argsrepr``, so a summary passed by the caller alone is lost on a retry);
- a worker answers inspect commands (Flower's worker page) with those
  summaries (`PrivateRequest`);
- the inference result of a reply that a delivery task sends is a summary
  (`delivered_summary`), and results carry no arguments
  (``result_extended = False`` in celeryconfig).

The Celery apps get the first two from `APP_OPTIONS` (`workers.app`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery.app import trace
from celery.app.amqp import AMQP
from celery.app.task import Task
from celery.worker.request import Request

from kernel.contract import (
    AFTER_HELPER_TASK,
    HELPER_FAILED_TASK,
    INFERENCE_TASK,
    Reply,
    delivery_queue,
    delivery_task,
    helper_task,
)

trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
# Twilio's client logs each request's form (numbers, message bodies) at INFO.
logging.getLogger("twilio.http_client").setLevel(logging.WARNING)
# Celery's pool logs each task's raw arguments at DEBUG ("TaskPool: Apply ..."), which
# GPT4P_LOG_LEVEL=DEBUG would otherwise let through.
logging.getLogger("celery.pool").setLevel(logging.INFO)

DELIVERY_PREFIX = delivery_task("")
HELPER_PREFIX = helper_task("")
# What a delivered reply's stored result keeps: how it was made, not to whom or what.
SUMMARY_FIELDS = frozenset({"job_id", "channel", "model", "engine", "finish_reason",
                            "prompt_tokens", "completion_tokens", "worker", "duration_ms",
                            "created_at"})  # fmt: skip


def _job_line(job_id: str, channel: str, messages: int) -> str:
    return f"<job {job_id} via {channel}, {messages} message(s)>"


def _count(value: object) -> int:
    return len(value) if isinstance(value, str | list) else 0


def _field(data: Mapping[str, Any], name: str, limit: int = 64) -> str:
    """A field of a task argument, as text of at most `limit` characters."""
    return str(data.get(name))[:limit]


def _handed_over(args: Sequence[Any]) -> str | None:
    """The summary of a task about a job handed to a helper (its `then` argument)."""
    then = next((a for a in args if isinstance(a, dict) and isinstance(a.get("job"), dict)), None)
    if then is None:
        return None
    return f"<answer to job {_field(then['job'], 'id')} from helper {_field(then, 'helper')}>"


def task_summary(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[str, str]:
    """What events and dashboards show as a task's arguments: (argsrepr, kwargsrepr)."""
    kwargsrepr = f"<{len(kwargs)} kwargs>" if kwargs else "{}"
    data = args[0] if args and isinstance(args[0], dict) else {}
    summary: str | None = None
    if name == INFERENCE_TASK and data:
        messages = _count(data.get("messages"))
        summary = _job_line(_field(data, "id"), _field(data, "channel"), messages)
    elif name.startswith(DELIVERY_PREFIX) and data:
        summary = f"<reply to job {_field(data, 'job_id')} via {_field(data, 'channel')}>"
    elif name.startswith(HELPER_PREFIX) and data:
        text, media = _count(data.get("text")), _count(data.get("media"))
        summary = f"<helper request, {text} chars, {media} media>"
    elif name in {AFTER_HELPER_TASK, HELPER_FAILED_TASK}:
        summary = _handed_over(args)
    return summary or f"<{len(args)} args>", kwargsrepr


def delivered_summary(reply: Reply) -> dict[str, Any]:
    """The stored result of a job whose reply a delivery task sends: no address, no text.

    The reply itself travels to the delivery task; a copy kept with the result
    would only keep who was answered, and what, readable for a day.
    """
    summary = reply.model_dump(mode="json", include=set(SUMMARY_FIELDS))
    return {**summary, "handed_to": delivery_queue(reply.channel)}


class PrivateAMQP(AMQP):
    """Celery's messaging, every task message showing `task_summary` as its arguments."""

    def as_task_v2(
        self, task_id: str, name: str, args: Any = None, kwargs: Any = None, *more: Any,
        **options: Any,
    ) -> Any:  # fmt: skip
        """Celery's task message, with summaries for the headers and the task-sent event."""
        options["argsrepr"], options["kwargsrepr"] = task_summary(name, args or (), kwargs or {})
        return super().as_task_v2(task_id, name, args, kwargs, *more, **options)


class PrivateRequest(Request):
    """A received task that reports its arguments to inspect commands as summaries."""

    def info(self, safe: bool = False) -> dict[str, Any]:
        """What ``inspect active/reserved/scheduled`` (and Flower) show of this task."""
        return dict(super().info(safe=True))


class PrivateTask(Task):
    """The base of every GPT4People task: its received requests are `PrivateRequest`s."""

    Request = f"{__name__}:PrivateRequest"


# How every Celery app of GPT4People is made: Celery("gpt4people", **APP_OPTIONS).
APP_OPTIONS: dict[str, Any] = {"amqp": PrivateAMQP, "task_cls": PrivateTask}
