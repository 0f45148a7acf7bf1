"""How a GPT4People Celery process is started: its command line, built here once, and the
mark that makes it an inference worker.

`gpt4people worker`, `deliver` and `flower` exec ``python -m celery -A workers ...``;
`gpt4people helper` runs the same worker arguments in its own process (its task is
registered there first). Every worker gets the same flags; only its queues, name and
pool differ by kind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Literal

from answer.engines import batch_slots, batches
from kernel.contract import delivery_queue, helper_queue
from kernel.settings import Settings

Pool = Literal["prefork", "threads"]

# Set by `gpt4people worker` for the Celery process it execs: that process answers
# inference jobs, so it loads the model at start (workers.lifecycle). Other workers
# (deliveries, helpers) import the same tasks but never load it.
INFERENCE_WORKER_ENV = "GPT4P_INFERENCE_WORKER"


def mark_inference_worker(environ: MutableMapping[str, str]) -> None:
    """Mark the environment a process is started with: it is an inference worker."""
    environ[INFERENCE_WORKER_ENV] = "1"


def is_inference_worker(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started as an inference worker (`mark_inference_worker`)."""
    return environ.get(INFERENCE_WORKER_ENV) == "1"


def celery_command(*arguments: str) -> list[str]:
    """``python -m celery -A workers ARGUMENTS`` with this interpreter, to exec."""
    return [sys.executable, "-m", "celery", "-A", "workers", *arguments]


def worker_arguments(
    queues: Iterable[str], hostname: str, concurrency: int, pool: Pool, loglevel: str
) -> list[str]:
    """The ``celery worker`` arguments of every GPT4People worker."""
    return [
        "--quiet",  # no banner: the worker's first line is its "ready." (in our log format)
        "worker", "--queues", ",".join(queues), "--hostname", hostname,
        "--concurrency", str(concurrency), "--pool", pool, "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
        "--task-events",  # for Flower and `celery events`
    ]  # fmt: skip


def inference_worker_arguments(
    settings: Settings, queues: Iterable[str], hostname: str, concurrency: int
) -> list[str]:
    """An inference worker's arguments: its pool follows from the engine it loads."""
    if batches(settings):
        # One batched engine in the worker process, loaded at worker start: its task
        # threads hand it their jobs, as many at a time as it has slots (some of them
        # kept for the fast lane: workers.lane).
        return worker_arguments(queues, hostname, batch_slots(settings), "threads",
                                settings.log_level)  # fmt: skip
    # One job at a time per pool process, each with its own engine, loaded after the fork.
    return worker_arguments(queues, hostname, concurrency, "prefork", settings.log_level)


def delivery_worker_arguments(
    channels: Iterable[str], hostname: str, concurrency: int, loglevel: str
) -> list[str]:
    """A delivery worker's arguments: it sends the replies of `channels` out."""
    # Processes, not threads: the threads pool's consumer dies on a lost Redis
    # connection (kombu restores unacked messages on a closed connection).
    queues = [delivery_queue(channel) for channel in channels]
    return worker_arguments(queues, hostname, concurrency, "prefork", loglevel)


def helper_worker_arguments(name: str, hostname: str, concurrency: int, loglevel: str) -> list[str]:
    """The worker arguments of helper `name`: its own queue, in processes (where Celery
    enforces the helper's time limits)."""
    return worker_arguments([helper_queue(name)], hostname, concurrency, "prefork", loglevel)
