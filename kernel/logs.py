"""Structured logs: one JSON object per line, with the job id on every line of a job's path.

`bind_job` puts a job id into a context variable for the code that handles
it; `JobContextFilter` copies it (or the running task's id, which the runtime
tells through `use_task_lookup`) onto every record; `JsonFormatter` writes the
record as JSON. GPT4P_LOG_FORMAT=text keeps the classic one-line format for
people reading a terminal.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
# The id and name of the task this thread runs, if any: Celery's, told by the runtime
# (workers.app); the kernel itself knows no task queue.
TaskLookup = Callable[[], tuple[str | None, str | None]]
_running_task: TaskLookup = lambda: (None, None)  # noqa: E731
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(job_id)s]: %(message)s"


def use_task_lookup(lookup: TaskLookup) -> None:
    """Say how to find the task this thread runs (its id and name), for log records."""
    global _running_task
    _running_task = lookup


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
        task_id, task_name = _running_task()
        record.job_id = _job_id.get() or task_id or "-"
        record.task = task_name
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
    # A Python warning becomes one record in this format, not a block of lines on stderr.
    logging.captureWarnings(True)
