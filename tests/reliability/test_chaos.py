"""Breaking things on purpose: workers killed mid-job still give every person one answer.

Real Redis (started here so it can be killed), the real model in a real
worker, a real delivery worker and the Twilio recorder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from gpt4people.redis_server import RedisServer, free_port
from tests.channels.twilio_recorder import TwilioRecorder
from tests.conftest import (
    base_env,
    queued_jobs,
    start_web,
    start_worker,
    stop_process,
    wait_for,
)
from tests.reliability.whereabouts import Witness

pytestmark = pytest.mark.model

HEARTBEAT_TTL = 3.0
# One decoding thread: these tests must pass on a 2-core machine kept busy by other work,
# where llama.cpp's threads, which wait for each other at every step, crawl (24 tokens:
# 8-42 s with 2 threads against 2.7 s with 1, measured beside two busy loops).
MODEL_THREADS = "1"


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def chaos_env(server: RedisServer, state: Path, twilio: TwilioRecorder) -> dict[str, str]:
    return base_env(
        state, redis_url=server.url, engine="llama", n_ctx="1024", n_threads=MODEL_THREADS,
        twilio_account_sid=twilio.account_sid, twilio_auth_token=twilio.auth_token,
        twilio_from="+15550000000", twilio_api_base=twilio.url, sms_retry_backoff="0.2",
        sms_max_tokens="24", sms_rate_limit="1000", worker_heartbeat_ttl=str(HEARTBEAT_TTL),
    )  # fmt: skip


def text(
    base: str, twilio: TwilioRecorder, sender: str, body: str, witness: Witness | None = None
) -> int:
    """Text `body` from `sender` as Twilio would; track its job with `witness`."""
    params, headers = twilio.webhook(f"{base}/sms", sender, body)
    if witness is not None:
        witness.track(f"sms-{params['MessageSid']}", sender)
    return httpx.post(f"{base}/sms", data=params, headers=headers, timeout=30).status_code


def answered(twilio: TwilioRecorder, numbers: list[str]) -> int:
    return sum(1 for n in numbers if twilio.delivered(n))


def kill_pool_process(worker: subprocess.Popen[bytes]) -> int:
    """SIGKILL the worker's pool process (as a segfault in llama.cpp would end it)."""
    (child,) = psutil.Process(worker.pid).children()
    os.kill(child.pid, signal.SIGKILL)
    return child.pid


@pytest.mark.parametrize("parallel", ["1", "8"], ids=["process-per-job", "batched"])
def test_killed_workers_lose_no_sms_and_send_none_twice(
    chaos_redis: RedisServer, tmp_path: Path, twilio: TwilioRecorder, parallel: str
) -> None:
    env = dict(chaos_env(chaos_redis, tmp_path, twilio), GPT4P_PARALLEL=parallel)
    # Numbers of their own: the Twilio recorder outlives one parametrization.
    numbers = [f"+1666{parallel}{i:06d}" for i in range(20)]
    deliver = start_worker(env, "chaos-deliver@test", command="deliver")
    worker = start_worker(env, "chaos-a@test", timeout=180)
    port = free_port()
    web = start_web(env, port)
    base = f"http://127.0.0.1:{port}"
    replacement: subprocess.Popen[bytes] | None = None
    client = redis.Redis.from_url(chaos_redis.url, socket_timeout=5)
    # The worker is killed on purpose; the delivery worker and the web app must stay up.
    witness = Witness(client, tmp_path, {"deliver": deliver, "web": web},
                      lambda number: len(twilio.delivered(number)))  # fmt: skip
    try:
        for i, number in enumerate(numbers):
            question = f"Tell me one fact about the number {i}."
            assert text(base, twilio, number, question, witness) == 200
        witness.wait(lambda: answered(twilio, numbers) >= 3, 120, "the first answers")
        if parallel == "1":
            # A segfault in the pool process: Celery requeues its job at once and a new
            # pool process loads the model. (Batched, the engine lives in the worker
            # process itself: a crash there is the whole-worker kill below.)
            witness.mark()
            witness.event(f"pool process {kill_pool_process(worker)} killed")
            witness.wait(lambda: answered(twilio, numbers) >= 8, 120, "answers after the pool kill")
        witness.mark()
        os.killpg(worker.pid, signal.SIGKILL)  # the whole worker: its job stays unacknowledged
        worker.wait(10)
        witness.event("whole worker killed")
        before = answered(twilio, numbers)
        killed_at = time.monotonic()
        replacement = start_worker(env, "chaos-b@test", timeout=180)
        witness.processes["replacement"] = replacement
        witness.wait(lambda: answered(twilio, numbers) > before, 120, "an answer after the kill")
        recovery = time.monotonic() - killed_at
        witness.wait(lambda: answered(twilio, numbers) == 20, 180, "all 20 answers")
        all_answered = time.monotonic() - killed_at
        witness.wait(lambda: queued_jobs(client) + client.llen("deliver.sms") == 0
                     and client.hlen("unacked") == 0, 60, "the queues to drain")  # fmt: skip
    finally:
        client.close()
        for process in (web, deliver, worker, replacement):
            if process is not None:
                stop_process(process)
    counts = [len(twilio.delivered(n)) for n in numbers]
    print(f"\nchaos ({parallel=}): 20 SMS, workers killed, answers={sum(counts)}, "
          f"duplicates={sum(c - 1 for c in counts if c > 1)}, first answer {recovery:.1f}s "
          f"after the whole-worker kill (new worker start included), all {all_answered:.1f}s "
          f"after")  # fmt: skip
    assert counts == [1] * 20
    # Delivery workers import the same tasks but never load the model.
    assert "model loaded" not in (tmp_path / "chaos-deliver@test.log").read_text()
    loads = [line for line in (tmp_path / "chaos-a@test.log").read_text().splitlines()
             if "model loaded" in line]  # fmt: skip
    # Unbatched, each pool process loads it after the fork (twice: one was killed).
    expected = "ForkPoolWorker" if parallel == "1" else "MainProcess"
    assert loads and all(expected in line for line in loads)


def test_a_delivery_killed_after_twilio_accepted_sends_nothing_twice(
    chaos_redis: RedisServer, tmp_path: Path, twilio: TwilioRecorder
) -> None:
    env = dict(chaos_env(chaos_redis, tmp_path, twilio), GPT4P_ENGINE="echo",
               GPT4P_TWILIO_TIMEOUT="2")  # fmt: skip
    number = "+16770000001"
    twilio.hang_after_accept.add(number)  # Twilio takes the message; our worker never hears back
    worker = start_worker(env, "echo-chaos@test")
    deliver = start_worker(env, "deliver-a@test", command="deliver")
    port = free_port()
    web = start_web(env, port)
    replacement: subprocess.Popen[bytes] | None = None
    try:
        assert text(f"http://127.0.0.1:{port}", twilio, number, "Only once, please") == 200
        wait_for(lambda: twilio.attempts(number), 30, "Twilio to accept the message")
        os.killpg(deliver.pid, signal.SIGKILL)  # dies before it can record the send
        deliver.wait(10)
        replacement = start_worker(env, "deliver-b@test", command="deliver")
        log = tmp_path / "deliver-b@test.log"
        wait_for(lambda: "already accepted by Twilio" in log.read_text(), 60,
                 "the new delivery worker to find the message in Twilio's log")  # fmt: skip
    finally:
        twilio.release.set()
        for process in (web, deliver, worker, replacement):
            if process is not None:
                stop_process(process)
    assert len(twilio.attempts(number)) == 1
    assert twilio.delivered(number) == ["Only once, please"]


def test_redis_killed_while_texts_arrive_loses_none_and_repeats_none(
    chaos_redis: RedisServer, tmp_path: Path, twilio: TwilioRecorder
) -> None:
    # A job running when Redis dies cannot be acknowledged; it is returned once it is
    # older than the hard time limit (short here, to keep the test short).
    env = dict(chaos_env(chaos_redis, tmp_path, twilio), GPT4P_ENGINE="echo",
               GPT4P_TASK_TIME_LIMIT="5", GPT4P_TASK_SOFT_TIME_LIMIT="4")  # fmt: skip
    numbers = [f"+1678000{i:04d}" for i in range(40)]
    workers = {"echo": start_worker(env, "echo-outage@test"),
               "deliver": start_worker(env, "deliver-outage@test", command="deliver")}  # fmt: skip
    port = free_port()
    web = start_web(env, port)
    base = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    client = redis.Redis.from_url(chaos_redis.url, socket_timeout=5)
    witness = Witness(client, tmp_path, {**workers, "web": web},
                      lambda number: len(twilio.delivered(number)))  # fmt: skip

    def keep_texting() -> None:  # a steady stream, whatever happens to Redis
        for number in numbers:
            statuses.append(text(base, twilio, number, f"hello from {number}", witness))

    sender = threading.Thread(target=keep_texting)
    recovery = 0.0
    try:
        sender.start()
        # The crash lands wherever the stream is: mid-pop, mid-job, mid-delivery.
        witness.wait(lambda: len(statuses) >= 12, 60, "the first texts to arrive")
        witness.mark()
        assert chaos_redis.process is not None
        chaos_redis.process.kill()  # a crash: no shutdown, only the append-only file remains
        chaos_redis.process.wait(10)
        witness.event(f"Redis killed after {len(statuses)} texts")
        killed_at = time.monotonic()
        witness.wait(lambda: len(statuses) >= 24, 60, "texts during the outage (spooled)")
        restarted = RedisServer(chaos_redis.data_dir, port=chaos_redis.port).start()
        chaos_redis.process = restarted.process
        witness.event(f"Redis restarted after {len(statuses)} texts")
        sender.join(60)
        assert statuses == [200] * len(numbers)  # Twilio always got its normal answer
        # No supervisor: each worker reconnects by itself (workers/consumer.py).
        witness.wait(lambda: answered(twilio, numbers) == len(numbers), 120,
                     "every accepted text to be answered")  # fmt: skip
        recovery = time.monotonic() - killed_at

        def drained() -> bool:
            queued = queued_jobs(client) + client.llen("deliver.sms")
            return queued + client.hlen("gpt4p:ledger") == 0

        witness.wait(drained, 60, "the queues and the ledger to drain")
    finally:
        sender.join(60)
        client.close()
        for process in (web, *workers.values()):
            stop_process(process)
    counts = [len(twilio.delivered(n)) for n in numbers]
    print(f"\nredis crash: {len(numbers)} SMS, answers={sum(counts)}, "
          f"duplicates={sum(c - 1 for c in counts if c > 1)}, "
          f"all answered {recovery:.1f}s after the kill")  # fmt: skip
    assert counts == [1] * len(numbers), witness.report()
    assert twilio.delivered(numbers[-1]) == [f"hello from {numbers[-1]}"]
