"""Structured logs: one JSON object per line, with the job id on every line of a job's path.

`bind_job` puts a job id into a context variable for the code that handles
it; `JobContextFilter` copies it (or the running Celery task's id) onto every
record; `JsonFormatter` writes the record as JSON. GPT4P_LOG_FORMAT=text keeps
the classic one-line format for people reading a terminal.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from celery import current_task

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(job_id)s]: %(message)s"


@contextmanager
def bind_job(job_id: str) -> Iterator[None]:
    """Tag every log record made inside this block with `job_id`."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


class JobContextFilter(logging.Filter):
    """Adds ``job_id`` (and ``task``) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate and keep the record."""
        job_id = _job_id.get()
        task = current_task._get_current_object() if current_task else None
        if job_id is None and task is not None and task.request.id:
            job_id = str(task.request.id)
        record.job_id = job_id or "-"
        record.task = task.name if task is not None else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job id, process."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
            "process": record.processName,
        }
        job_id = getattr(record, "job_id", "-")
        if job_id != "-":
            entry["job_id"] = job_id
        if getattr(record, "task", None):
            entry["task"] = record.task  # type: ignore[attr-defined]
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_handler(handler: logging.Handler, log_format: str) -> None:
    """Give `handler` our formatter and the job-id filter."""
    handler.addFilter(JobContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))


def configure_logging(level: str, log_format: str) -> None:
    """Set up the root logger of a GPT4People process."""
    handler = logging.StreamHandler()
    configure_handler(handler, log_format)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
