"""A bare Celery app: the anchor of `bench.llama`'s "echo job over HTTP" row.

Celery's default settings (JSON messages and results), a Redis broker and result
backend, one task that does nothing. `bench.llama` runs its worker as Celery's
defaults would, except for one process:

    BENCH_BARE_CELERY_URL=redis://... celery -A bench.bare_celery worker --concurrency 1

and times ``noop.delay().get()``: the least a Celery job can cost on that Redis.
"""

from __future__ import annotations

import os

from celery import Celery

URL_VARIABLE = "BENCH_BARE_CELERY_URL"
HOSTNAME = "bare@bench"

_url = os.environ.get(URL_VARIABLE, "redis://127.0.0.1:6379/2")
app = Celery("bare_celery", broker=_url, backend=_url)


@app.task
def noop() -> None:
    """Nothing: what is timed is the round trip through Celery and Redis."""


def use(url: str) -> None:
    """Point this process's app at the Redis database `url` (before its first use)."""
    app.conf.update(broker_url=url, result_backend=url)
