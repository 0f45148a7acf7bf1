"""Keeping people's messages and numbers out of logs and monitoring.

Celery logs a task's return value on success and shows its arguments in
events (Flower, ``celery events``). Ours carry prompts, replies, phone numbers
and addresses, so the success line drops the value and the arguments are
shown as a summary that names the job, not its content.
"""

from __future__ import annotations

import logging

from celery.app import trace

from workers.contract import Job

trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
# Twilio's client logs each request's form (numbers, message bodies) at INFO.
logging.getLogger("twilio.http_client").setLevel(logging.WARNING)


def job_summary(job: Job) -> str:
    """What logs and dashboards show instead of the job itself."""
    return f"<job {job.id} via {job.channel}, {len(job.messages)} message(s)>"
