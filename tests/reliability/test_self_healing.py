"""Workers heal themselves: no supervisor, Redis killed and restarted three times in a row.

A `gpt4people worker` (the batched model engine, a threads pool), a
`gpt4people deliver` and a `gpt4people helper` run on their own, each holding
work when Redis dies (a long generation, a send Twilio does not answer, a
helper call that takes seconds): the case in which kombu's cleanup of the lost
connection used to end the whole worker (celery/kombu#970). Each must come
back by itself, as the same process, and consume again.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from gpt4people.redis_server import RedisServer
from kernel.contract import ChatMessage, GenerationOptions, Job, Reply, helper_queue, helper_task
from kernel.keys import RECOVERY_OWNERS_KEY, UNACKED_KEY
from kernel.settings import Settings
from tests.channels.twilio_recorder import TwilioRecorder
from tests.conftest import ROOT, base_env, start_worker, stop_process, wait_for
from tests.reliability.test_chaos import MODEL_THREADS
from tests.reliability.whereabouts import Witness
from workers.app import celery_for
from workers.client import enqueue_delivery, submit, wait_for_reply

# Beyond pytest's 300 s default: the test's own deadlines must be the ones that fire, so
# that a failure prints where every job was.
pytestmark = [pytest.mark.model, pytest.mark.timeout(1200)]

ROUNDS = 3
HOSTNAMES = ["heal-worker@test", "heal-deliver@test", "heal-nap@test"]


@pytest.fixture
def outage_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def start_helper(env: dict[str, str], hostname: str) -> subprocess.Popen[bytes]:
    log = open(Path(env["GPT4P_STATE_DIR"]) / f"{hostname}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "helper", "tests.helpers.sample_helpers:nap",
         "--hostname", hostname, "--concurrency", "1"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return process


def job(text: str, max_tokens: int) -> Job:
    return Job(channel="cli", user="tester", reply_to="cli",
               messages=[ChatMessage(role="user", content=text)],
               options=GenerationOptions(max_tokens=max_tokens, temperature=0.0))  # fmt: skip


def sms_reply(job_id: str, number: str, text: str) -> Reply:
    return Reply(job_id=job_id, channel="sms", reply_to=number, reply_from="+15550000000",
                 text=text, model="none", engine="keyword")  # fmt: skip


def holders(client: redis.Redis) -> set[str]:
    """Hostnames of the workers holding a job now (the owners of unacknowledged messages)."""
    held = {tag.decode() for tag in client.hkeys(UNACKED_KEY)}
    owners = client.hgetall(RECOVERY_OWNERS_KEY)
    return {owner.decode().split("#")[0] for tag, owner in owners.items() if tag.decode() in held}


def nap(app: Celery, seconds: float) -> str:
    result = app.send_task(helper_task("nap"), args=[{"text": str(seconds)}],
                           queue=helper_queue("nap"))  # fmt: skip
    return str(result.id)


def test_standalone_workers_survive_three_redis_crashes_without_a_restart(
    outage_redis: RedisServer, tmp_path: Path, twilio: TwilioRecorder
) -> None:
    env = base_env(
        tmp_path, redis_url=outage_redis.url, engine="llama", n_ctx="512", parallel="4",
        n_threads=MODEL_THREADS,
        twilio_account_sid=twilio.account_sid, twilio_auth_token=twilio.auth_token,
        twilio_from="+15550000000", twilio_api_base=twilio.url, twilio_timeout="4",
        sms_retry_backoff="0.2", worker_heartbeat_ttl="3",
    )  # fmt: skip
    processes = {
        "worker": start_worker(env, HOSTNAMES[0], timeout=180),
        "deliver": start_worker(env, HOSTNAMES[1], command="deliver"),
    }
    processes["helper"] = start_helper(env, HOSTNAMES[2])
    app = celery_for(Settings(redis_url=outage_redis.url))
    client = redis.Redis.from_url(outage_redis.url, socket_timeout=5)
    witness = Witness(client, tmp_path, processes, lambda n: len(twilio.delivered(n)))
    server = outage_redis
    try:
        wait_for(lambda: witness.helper_registered("nap"), 60, "the nap helper to register")
        for round_ in range(1, ROUNDS + 1):
            # Work in each worker's hands when Redis dies: a long answer, a send Twilio
            # accepts but never answers, a helper call of several seconds.
            long = job(f"Write a long story about the number {round_}.", 400)
            submit(app, long, client=client)
            stuck = f"+1699000000{round_}"
            twilio.hang_after_accept.add(stuck)
            enqueue_delivery(app, client, sms_reply(f"heal-hang-{round_}", stuck, "in flight"))
            witness.track(long.id, "-")
            witness.track(f"heal-hang-{round_}", stuck)
            nap(app, 8)
            witness.wait(lambda: holders(client) >= set(HOSTNAMES), 60,
                         f"round {round_}: every worker to hold its work")  # fmt: skip
            witness.mark()
            assert server.process is not None
            server.process.kill()  # a crash: the append-only file is all that remains
            server.process.wait(10)
            witness.event(f"round {round_}: Redis killed")
            witness.wait(lambda: witness.logged_since_mark(HOSTNAMES, "Connection to broker lost"),
                         60, f"round {round_}: every worker to notice")  # fmt: skip
            server = RedisServer(outage_redis.data_dir, port=outage_redis.port).start()
            outage_redis.process = server.process
            witness.event(f"round {round_}: Redis restarted")
            # Each consumes again, as the same process, with no supervisor.
            answered = job(f"Say hello, round {round_}.", 8)
            submit(app, answered, client=client)
            number = f"+1699100000{round_}"
            enqueue_delivery(app, client, sms_reply(f"heal-new-{round_}", number, "after"))
            witness.track(answered.id, "-")
            witness.track(f"heal-new-{round_}", number)
            napped = app.AsyncResult(nap(app, 0))
            witness.wait(lambda a=answered: app.AsyncResult(a.id).ready(), 120,
                         f"round {round_}: the worker to answer a new job")  # fmt: skip
            witness.wait(lambda n=number: twilio.delivered(n) == ["after"], 120,
                         f"round {round_}: the new SMS to be delivered")  # fmt: skip
            witness.wait(napped.ready, 120, f"round {round_}: the helper to answer a new call")
            assert wait_for_reply(app, answered.id, 1).text.strip()
            assert napped.get(timeout=1)["text"] == "slept 0s"
            assert {name: p.poll() for name, p in processes.items()} == dict.fromkeys(processes)
        # Each send Twilio took but never answered is settled: found in Twilio's log. (A
        # fresh AsyncResult each time: one keeps the FAILURE an outage stored before.)
        for round_ in range(1, ROUNDS + 1):
            hung = f"heal-hang-{round_}.deliver"
            what = f"the send Twilio left unanswered in round {round_} to be settled"
            witness.wait(lambda h=hung: app.AsyncResult(h).state == "SUCCESS", 120, what)
    finally:
        twilio.release.set()
        app.close()
        for process in processes.values():
            stop_process(process)
    # ... and was not sent again, through three reconnects.
    for round_ in range(1, ROUNDS + 1):
        assert len(twilio.delivered(f"+1699000000{round_}")) == 1
