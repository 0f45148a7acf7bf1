"""Redis high availability: the primary dies and nothing accepted is lost or sent twice.

A real primary, replica and three Sentinels (with passwords) on loopback;
GPT4People's processes get only the Sentinels' addresses. Texts keep
arriving; after 15 the primary is SIGKILLed (its host dies). The Sentinels
promote the replica, every process finds the new primary by itself, and
every text that Twilio got a 200 for is answered exactly once: the webhook
answered only once a replica had the job (Redis WAIT).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from channels.web import create_app
from gpt4people.redis_server import free_port
from kernel.redis_client import redis_client
from kernel.replication import ReplicaWait
from kernel.settings import Settings
from tests.channels.twilio_recorder import TwilioRecorder
from tests.conftest import (
    base_env,
    queued_jobs,
    start_web,
    start_worker,
    stop_process,
    wait_for,
)
from tests.reliability.redis_ha import REDIS_PASSWORD, SentinelCluster
from tests.reliability.test_chaos import text
from tests.reliability.whereabouts import Witness

TEXTS = 40
KILL_AFTER = 15
# Beyond pytest's 300 s default: the tests' own deadlines must fire, with their reports.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(tmp_path / "redis-ha").start()
    yield cluster
    cluster.stop()


def test_a_failover_loses_no_accepted_sms_and_sends_none_twice(
    cluster: SentinelCluster, tmp_path: Path, twilio: TwilioRecorder
) -> None:
    env = base_env(
        tmp_path, engine="echo", twilio_account_sid=twilio.account_sid,
        twilio_auth_token=twilio.auth_token, twilio_from="+15550000000",
        twilio_api_base=twilio.url, sms_retry_backoff="0.2", sms_rate_limit="1000",
        worker_heartbeat_ttl="3", **cluster.env(),
    )  # fmt: skip
    numbers = [f"+1680000{i:04d}" for i in range(TEXTS)]
    workers = {"echo": start_worker(env, "echo-ha@test"),
               "deliver": start_worker(env, "deliver-ha@test", command="deliver")}  # fmt: skip
    port = free_port()
    web = start_web(env, port)
    base = f"http://127.0.0.1:{port}"
    client = redis_client(cluster.url, Settings(**cluster.env()), socket_timeout=5)
    witness = Witness(client, tmp_path, {**workers, "web": web},
                      lambda number: len(twilio.delivered(number)))  # fmt: skip
    statuses: list[int] = []
    sent_at: dict[str, float] = {}
    first_answer: dict[str, float] = {}

    def keep_texting() -> None:
        for number in numbers:
            sent_at[number] = time.monotonic()
            statuses.append(text(base, twilio, number, f"hello from {number}", witness))

    done = threading.Event()

    def watch_answers() -> None:  # when each first answer came, to a tenth of a second
        while not done.wait(0.05):
            for number in numbers:
                if number not in first_answer and twilio.delivered(number):
                    first_answer[number] = time.monotonic()

    sender = threading.Thread(target=keep_texting)
    watcher = threading.Thread(target=watch_answers, daemon=True)
    try:
        watcher.start()
        sender.start()
        witness.wait(lambda: len(statuses) >= KILL_AFTER, 60, f"the first {KILL_AFTER} texts")
        witness.mark()
        old_primary, killed_at = cluster.kill_primary()
        witness.event(f"primary (port {old_primary}) killed after {len(statuses)} texts")
        witness.wait(lambda: cluster.primary_port() != old_primary, 60, "the failover")
        witness.event(f"Sentinels promoted port {cluster.primary_port()}")
        sender.join(120)
        # Twilio always got its normal answer
        assert statuses == [200] * TEXTS, f"webhook answers {statuses}\n{witness.report()}"
        witness.wait(lambda: len(first_answer) == TEXTS, 120, "every accepted text to be answered")

        def drained() -> bool:
            queued = queued_jobs(client) + client.llen("deliver.sms")
            return queued + client.hlen("gpt4p:ledger") == 0

        witness.wait(drained, 60, "the queues and the ledger to drain")
        # The promoted primary has no replica (the old one is dead): what it accepted is
        # not protected against a second failover, and the operator is told so.
        counters = client.hgetall("gpt4p:metrics:counters")
        unprotected = [int(v) for k, v in counters.items()
                       if k.startswith(b"gpt4p_replication_unprotected")]  # fmt: skip
        assert unprotected and unprotected[0] >= 1, counters
    finally:
        done.set()
        sender.join(60)
        client.close()
        for process in (web, *workers.values()):
            stop_process(process)
    counts = [len(twilio.delivered(n)) for n in numbers]
    assert counts == [1] * TEXTS, witness.report()
    after = [t - killed_at for t in first_answer.values() if t > killed_at]
    later = [first_answer[n] - killed_at for n in numbers if sent_at[n] > killed_at]
    print(f"\nsentinel failover: {TEXTS} SMS, answers={sum(counts)}, "
          f"duplicates={sum(c - 1 for c in counts if c > 1)}, next answer {min(after):.1f}s "
          f"after the kill, first answer to a text sent after it {min(later):.1f}s, "
          f"all answered {max(after):.1f}s after it")  # fmt: skip


def test_replica_wait_confirms_a_write_and_gives_up_on_a_stalled_replica(
    cluster: SentinelCluster,
) -> None:
    primary = redis.Redis(port=cluster.primary.port, password=REDIS_PASSWORD, socket_timeout=5)
    waiter = ReplicaWait(primary, replicas=1, timeout=0.5)
    primary.set("accepted", "job")
    assert waiter.wait()
    started = time.perf_counter()
    for _ in range(100):
        assert waiter.wait()
    print(f"\nWAIT for one replica (loopback): {(time.perf_counter() - started) * 10:.2f} ms")
    replica = redis.Redis(port=cluster.replica.port, password=REDIS_PASSWORD, socket_timeout=5)
    assert replica.get("accepted") == b"job"
    # A replica that stops acknowledging (its host stalls): the wait ends at its timeout,
    # says so and counts it, instead of holding the channel's answer forever.
    assert cluster.replica.process is not None
    os.kill(cluster.replica.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert not waiter.wait()
        assert time.monotonic() - started < 5
        assert waiter.timeouts == 1
        metrics = primary.hgetall("gpt4p:metrics:counters")
        assert any(b"gpt4p_replication_wait_timeouts" in field for field in metrics)
    finally:
        os.kill(cluster.replica.process.pid, signal.SIGCONT)
    wait_for(waiter.wait, 30, "the replica to acknowledge again")
    primary.close()
    replica.close()


def test_without_replicas_nothing_is_waited_for(tmp_path: Path) -> None:
    from gpt4people.redis_server import RedisServer

    with RedisServer(tmp_path / "alone") as server:
        client = redis.Redis.from_url(server.url)
        waiter = ReplicaWait(client, replicas=1, timeout=5)
        started = time.monotonic()
        assert waiter.wait()
        assert time.monotonic() - started < 1  # not the 5 s timeout
        assert waiter.timeouts == 0
        assert not client.hgetall("gpt4p:metrics:counters")  # one Redis is not "degraded"
        # With Sentinels configured, a primary without a replica is a degraded state: each
        # message it accepts is counted, since nothing protects it from the next failover.
        degraded = ReplicaWait(client, replicas=1, timeout=5, expect_replicas=True)
        assert not degraded.wait()
        assert not degraded.wait()
        assert degraded.unprotected == 2
        counters = client.hgetall("gpt4p:metrics:counters")
        assert [int(v) for k, v in counters.items()
                if k.startswith(b"gpt4p_replication_unprotected")] == [2]  # fmt: skip
        client.close()


def test_the_webhook_answers_twilio_only_after_waiting_for_the_replica(
    cluster: SentinelCluster, tmp_path: Path, twilio: TwilioRecorder
) -> None:
    # The replica stalls: the webhook waits for it (up to the timeout), says so in the
    # metrics, and still accepts the text (refusing it would lose it: Twilio does not retry).
    settings = Settings(
        **cluster.env(), state_dir=tmp_path, redis_wait_timeout=0.5,
        twilio_account_sid=twilio.account_sid, twilio_auth_token=twilio.auth_token,
    )  # type: ignore[arg-type]  # fmt: skip
    primary = redis.Redis(port=cluster.primary.port, password=REDIS_PASSWORD, socket_timeout=5)
    params, headers = twilio.webhook("http://testserver/sms", "+15558880000", "wait for me")
    assert cluster.replica.process is not None
    os.kill(cluster.replica.process.pid, signal.SIGSTOP)
    try:
        with TestClient(create_app(settings)) as web:
            response = web.post("/sms", data=params, headers=headers)
        assert response.status_code == 200
        counters = primary.hgetall("gpt4p:metrics:counters")
        waited = [v for k, v in counters.items() if b"gpt4p_replication_wait_timeouts" in k]
        assert waited and int(waited[0]) >= 1
        assert queued_jobs(primary) == 1  # accepted all the same
    finally:
        os.kill(cluster.replica.process.pid, signal.SIGCONT)
        primary.close()


def test_a_part_whose_replica_wait_fails_is_sent_at_once_by_the_retry(
    tmp_path: Path, twilio: TwilioRecorder
) -> None:
    # The wait before an SMS send fails (here the primary refuses WAIT; in life, the
    # connection breaks in a failover). Nothing was sent, so the part's claim is released
    # and the task's retry sends it now, not after the in-flight claim goes stale.
    from channels.sms.delivery import TwilioSender, send_parts
    from channels.sms.state import SmsState
    from gpt4people.redis_server import RedisServer
    from kernel.contract import Reply

    primary = RedisServer(tmp_path / "primary",
                          extra_args=["--rename-command", "WAIT", "WAIT-DISABLED"])  # fmt: skip
    replica = RedisServer(tmp_path / "replica",
                          extra_args=["--replicaof", "127.0.0.1", str(primary.port)])  # fmt: skip
    to = "+15557770000"
    reply = Reply(job_id="sms-SMwaitfails", channel="sms", reply_to=to, reply_from="+15550000000",
                  text="sent once", model="m", engine="echo")  # fmt: skip
    settings = Settings(redis_url=primary.url, twilio_account_sid=twilio.account_sid,
                        twilio_auth_token=twilio.auth_token, twilio_api_base=twilio.url,
                        twilio_from="+15550000000")  # type: ignore[arg-type]  # fmt: skip
    with primary, replica, redis_client(primary.url, socket_timeout=5) as client:
        # Online, not just connected: a replica still syncing is not counted, and then
        # nothing is waited for (so nothing would fail).
        wait_for(lambda: client.info("replication").get("slave0", {}).get("state") == "online",
                 30, "the replica to finish its first sync")  # fmt: skip
        with pytest.raises(redis.ResponseError):
            send_parts(reply, TwilioSender(settings), SmsState(client, settings), max_parts=3)
        assert twilio.attempts(to) == []
        # The retry, on a connection whose wait works (no replica asked for, to keep it short).
        retry_settings = settings.model_copy(update={"redis_wait_replicas": 0})
        with redis_client(primary.url, socket_timeout=5) as retry_client:
            sent = send_parts(reply, TwilioSender(retry_settings),
                              SmsState(retry_client, retry_settings), max_parts=3)  # fmt: skip
    assert sent == 1
    assert twilio.delivered(to) == ["sent once"]
