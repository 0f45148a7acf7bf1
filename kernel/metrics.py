"""Prometheus metrics shared by every process through Redis, served by the web app.

Channels, workers, helpers and deliverers run in many processes (and hosts);
each adds to counters, histograms and gauges kept in Redis hashes, and
``GET /metrics`` renders them with prometheus_client. Recording never fails a
job: a Redis error while recording is logged at debug level and dropped.

A scrape reads a fixed number of keys, whatever else Redis holds: the
counters, the gauges, the index of histograms, and the index of queues (every
queue a job was submitted to or a worker consumes, written when that happens),
whose lengths it asks in one pipeline. It never scans the keyspace, so
``/metrics`` costs the same on a Redis with a million conversations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.client import Pipeline

from kernel.channels import delivered_channels
from kernel.contract import INFERENCE_QUEUE
from kernel.keys import (
    METRICS_COUNTERS_KEY,
    METRICS_GAUGES_KEY,
    METRICS_HISTOGRAM_PREFIX,
    METRICS_HISTOGRAMS_KEY,
    METRICS_QUEUES_KEY,
    queue_keys,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

DOCS = {
    "gpt4p_jobs_received": "Jobs accepted onto a queue, per channel.",
    "gpt4p_jobs_by_priority": "Jobs accepted onto a queue, per priority (interactive, normal, "
    "bulk).",
    "gpt4p_jobs_over_fair_share": "Jobs queued as bulk because their sender had "
    "GPT4P_SENDER_SLOTS jobs in flight, per channel.",
    "gpt4p_tokens_generated": "Completion tokens generated, per model.",
    "gpt4p_helper_calls": "Helper calls, per helper.",
    "gpt4p_helper_failures": "Helper calls that failed, per helper and reason.",
    "gpt4p_deliveries": "Replies delivered, per channel.",
    "gpt4p_delivery_failures": "Replies that could not be delivered, per channel and reason.",
    "gpt4p_outbound_capped": "Sends refused by the hourly outbound cap (reply held), per channel.",
    "gpt4p_webhook_duplicates": "Webhooks refused as already seen (retries, replays), per channel.",
    "gpt4p_job_latency_seconds": "From job creation to reply, per channel.",
    "gpt4p_time_to_first_token_seconds": "From job start on a worker to its first text.",
    "gpt4p_worker_tokens_per_second": "Decode speed of each worker's latest answer.",
    "gpt4p_model_load_seconds": "How long each inference process took to load its model.",
    "gpt4p_queue_depth": "Jobs waiting in each queue.",
    "gpt4p_replication_wait_timeouts": "Messages accepted before enough replicas confirmed them.",
    "gpt4p_replication_unprotected": "Messages accepted with Sentinels but no replica online.",
}


def _field(name: str, labels: dict[str, str]) -> str:
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _parse(field: str) -> tuple[str, dict[str, str]]:
    name, _, raw = field.partition("|")
    return name, dict(pair.split("=", 1) for pair in raw.split(",") if pair)


class Metrics:
    """Recording metrics into Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._batch: Pipeline | None = None

    @contextmanager
    def batch(self) -> Iterator[Metrics]:
        """Metrics whose writes reach Redis together, in one round trip, at the end."""
        batched = Metrics(self.redis)
        batched._batch = self.redis.pipeline()
        yield batched
        self._safely(batched._batch.execute)

    @classmethod
    def riding(cls, pipe: Pipeline) -> Metrics:
        """Metrics written into `pipe`, a pipeline its caller executes with commands of its
        own (one round trip for both; the caller decides what a failure means)."""
        metrics = cls(pipe)
        metrics._batch = pipe
        return metrics

    def count(self, name: str, labels: dict[str, str], amount: float = 1.0) -> None:
        """Add `amount` to a counter."""
        self._write(lambda r: r.hincrbyfloat(METRICS_COUNTERS_KEY, _field(name, labels), amount))

    def gauge(self, name: str, labels: dict[str, str], value: float) -> None:
        """Set a gauge."""
        self._write(lambda r: r.hset(METRICS_GAUGES_KEY, _field(name, labels), str(value)))

    def observe(
        self, name: str, labels: dict[str, str], value: float, buckets: Sequence[float]
    ) -> None:
        """Add one observation to a histogram."""
        key = METRICS_HISTOGRAM_PREFIX + _field(name, labels)
        bucket = next((str(b) for b in buckets if value <= b), "+Inf")

        def record(pipe: Pipeline) -> None:
            pipe.sadd(METRICS_HISTOGRAMS_KEY, key)
            pipe.hincrby(key, bucket, 1)
            pipe.hincrbyfloat(key, "sum", value)
            pipe.hincrby(key, "count", 1)
            pipe.hset(key, "buckets", ",".join(str(b) for b in buckets))

        self._write(record)

    def note_queues(self, names: Iterable[str]) -> None:
        """Add queues to the index whose depths a scrape reports (idempotent, one SADD)."""
        names = sorted(set(names))
        if names:
            self._write(lambda r: r.sadd(METRICS_QUEUES_KEY, *names))

    def _write(self, commands: Callable[[Pipeline], object]) -> None:
        """Queue `commands` on the batch, or send them now in one transaction."""
        if self._batch is not None:
            commands(self._batch)
            return
        pipe = self.redis.pipeline()
        commands(pipe)
        self._safely(pipe.execute)

    def _safely(self, action: Callable[[], object]) -> None:
        try:
            action()
        except redis.RedisError as error:
            log.debug("metric not recorded: %s", error)


class RedisCollector(Collector):
    """Renders what every process recorded, plus current queue depths."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families for one scrape."""
        yield from self._families(METRICS_COUNTERS_KEY, CounterMetricFamily)
        yield from self._families(METRICS_GAUGES_KEY, GaugeMetricFamily)
        yield from self._histograms()
        yield self._queue_depths()

    def _families(self, key: str, kind: type) -> Iterator[Metric]:
        raw = cast(dict[bytes, bytes], self.redis.hgetall(key))
        grouped: dict[str, list[tuple[dict[str, str], float]]] = {}
        for field, number in raw.items():
            name, labels = _parse(field.decode())
            grouped.setdefault(name, []).append((labels, float(number)))
        for name, samples in sorted(grouped.items()):
            label_names = sorted(samples[0][0])
            family = kind(name, DOCS.get(name, name), labels=label_names)
            for labels, value in samples:
                family.add_metric([labels.get(n, "") for n in label_names], value)
            yield family

    def _histograms(self) -> Iterator[Metric]:
        keys = sorted(
            k.decode() for k in cast(set[bytes], self.redis.smembers(METRICS_HISTOGRAMS_KEY))
        )
        grouped: dict[str, list[tuple[dict[str, str], dict[str, str]]]] = {}
        for key in keys:
            name, labels = _parse(key.removeprefix(METRICS_HISTOGRAM_PREFIX))
            raw = cast(dict[bytes, bytes], self.redis.hgetall(key))
            grouped.setdefault(name, []).append(
                (labels, {k.decode(): v.decode() for k, v in raw.items()})
            )
        for name, series in grouped.items():
            label_names = sorted(series[0][0])
            family = HistogramMetricFamily(name, DOCS.get(name, name), labels=label_names)
            for labels, data in series:
                cumulative, buckets = 0.0, []
                for bound in [*data.get("buckets", "").split(","), "+Inf"]:
                    if not bound:
                        continue
                    cumulative += float(data.get(bound, "0"))
                    buckets.append((bound, cumulative))
                family.add_metric([labels.get(n, "") for n in label_names], buckets,
                                  float(data.get("sum", "0")))  # fmt: skip
            yield family

    def _queue_depths(self) -> Metric:
        family = GaugeMetricFamily("gpt4p_queue_depth", DOCS["gpt4p_queue_depth"], labels=["queue"])
        for name, depth in indexed_queue_depths(self.redis).items():
            family.add_metric([name], float(depth))
        return family


def indexed_queue_depths(client: redis.Redis) -> dict[str, int]:
    """Jobs waiting in the queues every deployment has and in the indexed ones (no SCAN)."""
    fixed = {INFERENCE_QUEUE, *(c.delivery_queue for c in delivered_channels())}
    names = fixed | {n.decode() for n in cast(set[bytes], client.smembers(METRICS_QUEUES_KEY))}
    return queue_depths_of(client, names)


def queue_depths_of(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Jobs waiting in each of `queues` (sorted by name), in one round trip; a name that is
    not a list is no queue and left out."""
    names = sorted(set(queues))
    pipe = client.pipeline(transaction=False)
    for name in names:
        for key in queue_keys(name):  # bulk jobs wait in a list of their own (priority 9)
            pipe.llen(key)
    lengths = iter(pipe.execute(raise_on_error=False))
    depths = {}
    for name in names:
        parts = [next(lengths) for _ in queue_keys(name)]
        # A name that is not a list (WRONGTYPE) is not a queue: left out, not an error.
        if not isinstance(parts[0], Exception):
            depths[name] = sum(int(part) for part in parts if not isinstance(part, Exception))
    return depths
