"""The fast lane: slots of a batched worker that only interactive jobs can take.

A Celery worker takes a new job when one of its pool's threads is free; a batched worker
whose GPT4P_PARALLEL slots are all busy with long bulk generations would take a person's
SMS only once one of them ends, minutes later. So interactive jobs go to each inference
queue's fast lane, `<queue>.interactive` (`kernel.contract.queue_for`), and a batched
worker consumes those lanes twice:

- its main consumer (Celery's) takes from every queue, fast lanes first
  (``queue_order_strategy = priority``), at most GPT4P_PARALLEL jobs at a time;
- `FastLane`, a second consumer on its own channel (Celery's documented ConsumerStep),
  takes only from the fast lanes, at most GPT4P_PRIORITY_SLOTS jobs at a time, and hands
  them to the same pool through Celery's own task handler (same acknowledgement, events,
  recovery and ledger as any job).

The pool has GPT4P_PARALLEL + GPT4P_PRIORITY_SLOTS threads and the engine as many slots,
so a job from the lane starts at once, and the engine then pauses the less urgent jobs
while it generates (`answer.engines.batched`). Unbatched workers (one process per job)
have no lane: their pool takes fast lanes first, that is all.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu import Consumer
from kombu.common import ignore_errors

from answer.engines import batches
from kernel.contract import INTERACTIVE_SUFFIX
from kernel.settings import Settings, get_settings
from workers.commandline import is_inference_worker

log = logging.getLogger(__name__)


def lane_slots(settings: Settings) -> int:
    """The pool threads this process keeps for its fast lanes (0: this is no batched
    inference worker, or GPT4P_PRIORITY_SLOTS is 0)."""
    if not is_inference_worker() or not batches(settings):
        return 0
    return settings.priority_slots


class FastLane(bootsteps.ConsumerStep):
    """A second consumer of the worker's fast lanes, with GPT4P_PRIORITY_SLOTS places."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        """Consume the fast lanes (again after each reconnection: Celery restarts its steps);
        other workers open no channel for it."""
        self._consumer = c
        self._slots = lane_slots(get_settings())
        self._lanes = [q for q in c.task_consumer.queues if q.name.endswith(INTERACTIVE_SUFFIX)]
        if self._slots and self._lanes:
            super().start(c)

    def stop(self, c: Any) -> None:
        """Stop taking jobs, as Celery's own task consumer does at a warm shutdown: cancel,
        but keep the channel open while the pool finishes its jobs (closing it would put
        every unacknowledged job back on its queue to be answered a second time)."""
        for consumer in self.consumers or []:
            ignore_errors(c.connection, consumer.cancel)

    def shutdown(self, c: Any) -> None:
        """Close the channel once the worker is done (its jobs acknowledged)."""
        self._close(c, cancel_consumers=True)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        """One kombu consumer of the fast lanes this worker consumes, on its own channel,
        handing each job to Celery's own task handler (and so to the same pool)."""
        c = self._consumer
        log.debug("fast lane: %d slots on %s", self._slots, ", ".join(q.name for q in self._lanes))
        return [
            Consumer(channel, queues=self._lanes, on_message=c.create_task_handler(),
                     accept=c.app.conf.accept_content, prefetch_count=self._slots)
        ]  # fmt: skip
