"""Outbound caps, personal data in Flower and results, webhook replays (issue 14: 1, 6, 15).

One stack for the module on its own Redis database: an echo inference worker,
a delivery worker for SMS and email, and the web app under uvicorn; Twilio's
REST API is the recorder, SMTP is aiosmtpd. Both outbound caps are set to CAP
per hour, as an operator would set them low, and each test starts with the
counts of a fresh hour. What Flower would show is read from a real Celery
event stream, what Celery stored from the result keys in Redis.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from gpt4people.redis_server import RedisServer, free_port
from gpt4people.whereabouts import locate_jobs
from kernel.contract import Reply
from kernel.keys import RESULT_KEY_PREFIX
from tests.channels.mail_servers import SmtpCapture
from tests.channels.test_http import metric_values
from tests.channels.test_sms import new_sid, replies, text
from tests.channels.twilio_recorder import TwilioRecorder
from tests.conftest import (
    base_env,
    emptied_database,
    redis_url,
    settings_of,
    start_web,
    start_worker,
    stop_process,
    wait_for,
)
from tests.security.conftest import DB_SEC_SMS
from workers.app import celery_for
from workers.client import enqueue_delivery

OUTBOUND_KEYS = "gpt4p:outbound:*"  # the caps' counts (channels.outbound_cap.PREFIX)
CAP = 3  # replies per hour and channel
EXTRA = 2  # replies past the cap in a spam run
HOUR = 3600
WEEK = 7 * 24 * 3600
ECHO, DELIVER = "echo@sec-sms", "deliver@sec-sms"

_numbers = itertools.count(1)


def fresh_number() -> str:
    """A phone number no other test texts from."""
    return f"+1666{next(_numbers):07d}"


@pytest.fixture(scope="module")
def stack_env(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
    twilio: TwilioRecorder, smtp: SmtpCapture,
) -> dict[str, str]:  # fmt: skip
    """Settings of the module's processes: low outbound caps, their own database and logs."""
    return base_env(
        tmp_path_factory.mktemp("sec-sms"),
        redis_url=redis_url(redis_server, DB_SEC_SMS),
        engine="echo",
        **twilio.settings(),
        sms_retry_backoff="0.1",
        smtp_host=smtp.host,
        smtp_port=str(smtp.port),
        smtp_starttls="false",
        email_from="bot@gpt4people.test",
        email_retry_backoff="0.1",
        sms_max_per_hour=str(CAP),
        email_max_per_hour=str(CAP),
    )


@pytest.fixture(scope="module")
def client(stack_env: dict[str, str]) -> Iterator[redis.Redis]:
    """A client of the module's database, empty at the start and at the end."""
    with emptied_database(stack_env["GPT4P_REDIS_URL"]) as client:
        yield client


@pytest.fixture(scope="module")
def web(stack_env: dict[str, str], client: redis.Redis) -> Iterator[str]:
    """The echo worker, the delivery worker and the web app; yields the web app's URL."""
    processes = [start_worker(stack_env, ECHO), start_worker(stack_env, DELIVER, command="deliver")]
    try:
        port = free_port()
        processes.append(start_web(stack_env, port))
        yield f"http://127.0.0.1:{port}"
    finally:
        for process in reversed(processes):
            stop_process(process)


@pytest.fixture(scope="module")
def app(stack_env: dict[str, str]) -> Iterator[Celery]:
    """A client-side Celery app of the stack, as the channels and Flower have."""
    app = celery_for(settings_of(stack_env))
    yield app
    app.close()


@pytest.fixture(autouse=True)
def fresh_hour(client: redis.Redis) -> None:
    """Each test starts with the outbound counts of a new hour, far from its end."""
    wait_for(lambda: HOUR - time.time() % HOUR > 120, 130, "an hour with two minutes left")
    keys = list(client.scan_iter(match=OUTBOUND_KEYS))
    if keys:
        client.delete(*keys)


def deliver_log(stack_env: dict[str, str]) -> Path:
    """The delivery worker's log file."""
    return Path(stack_env["GPT4P_STATE_DIR"]) / f"{DELIVER}.log"


def capped(web: str, channel: str) -> float:
    """gpt4p_outbound_capped_total of `channel`, as /metrics reports it."""
    return metric_values(web).get(("gpt4p_outbound_capped_total", (("channel", channel),)), 0.0)


def settled(client: redis.Redis, job_id: str) -> bool:
    """Whether the job and its delivery are neither queued, held by a worker nor ledgered."""
    where = locate_jobs(client, [job_id])[job_id]
    return all(not t.queued_in and t.held_by is None and t.ledgered_s is None
               for t in (where.inference, where.delivery))  # fmt: skip


def scheduled(app: Celery, task_ids: set[str]) -> list[dict[str, Any]]:
    """The requests of these tasks that the delivery worker holds for later (ETA)."""
    answers = app.control.inspect(destination=[DELIVER], timeout=2).scheduled() or {}
    entries = [entry["request"] for entry in answers.get(DELIVER, [])]
    return [request for request in entries if request["id"] in task_ids]


# --- 1: a global outbound cap per hour, for SMS and for email ------------------------------


def test_sms_replies_past_the_hourly_cap_are_held_not_sent(
    web: str, twilio: TwilioRecorder, app: Celery, stack_env: dict[str, str]
) -> None:
    log, line = deliver_log(stack_env), "outbound sms cap of 3 per hour"
    logged_before = log.read_text().count(line)
    numbers = [fresh_number() for _ in range(CAP + EXTRA)]  # a spam run from many numbers
    sids = [new_sid() for _ in numbers]
    for number, sid in zip(numbers, sids, strict=True):
        assert text(web, twilio, number, "Tell me a joke", sid=sid).status_code == 200

    def all_handled() -> bool:
        sent = sum(len(twilio.attempts(n)) for n in numbers)
        return sent == CAP and capped(web, "sms") == EXTRA

    wait_for(all_handled, 60, f"{CAP} replies sent and {EXTRA} refused by the cap")
    # Held, not lost: each waits on the delivery worker for the next hour, as a summary.
    deliveries = {f"sms-{sid}.deliver" for sid in sids}

    def all_held() -> list[dict[str, Any]] | None:
        held = scheduled(app, deliveries)
        return held if len(held) == EXTRA else None

    held = wait_for(all_held, 30, f"{EXTRA} held replies on the delivery worker")
    assert all(r["args"] == f"<reply to job {r['id'][: -len('.deliver')]} via sms>" for r in held)
    assert sum(len(twilio.attempts(n)) for n in numbers) == CAP
    content = log.read_text()
    assert content.count(line) - logged_before == 1  # one warning for the hour, not per reply
    assert not any(number in content for number in numbers)


def test_email_replies_past_the_hourly_cap_are_held_not_sent(
    web: str, smtp: SmtpCapture, app: Celery, client: redis.Redis
) -> None:
    people = [f"rotating{next(_numbers)}@elsewhere.example" for _ in range(CAP + EXTRA)]
    for person in people:
        reply = Reply(job_id=f"email-cap-{uuid.uuid4().hex}", channel="email", reply_to=person,
                      text="Buy now!", model="echo", engine="echo")  # fmt: skip
        enqueue_delivery(app, client, reply)

    def all_handled() -> bool:
        sent = sum(len(smtp.sent_to(p)) for p in people)
        return sent == CAP and capped(web, "email") == EXTRA

    wait_for(all_handled, 60, f"{CAP} mails sent and {EXTRA} refused by the cap")
    assert sum(len(smtp.sent_to(p)) for p in people) == CAP


def test_the_cap_holds_a_reply_whole_and_a_failed_send_gives_its_slot_back(
    client: redis.Redis,
) -> None:
    from channels.outbound_cap import MAX_HOLD_STEP_S, OutboundCap, OutboundCappedError

    cap = OutboundCap(client, "test", CAP)
    two_parts = cap.take(2)
    with pytest.raises(OutboundCappedError):
        cap.take(2)  # 2 + 2 > 3: a reply is never cut in two by the cap
    two_parts.use()  # the first part went out, the second failed
    two_parts.give_back()
    cap.take(2)  # 1 + 2 = 3
    with pytest.raises(OutboundCappedError) as refused:
        cap.take(1)
    assert 0 < refused.value.retry_in <= MAX_HOLD_STEP_S
    assert OutboundCap(client, "test", 0).take(1_000).unused == 0  # 0: no cap


def test_a_reply_held_past_its_max_age_is_dropped_and_counted(
    web: str, client: redis.Redis
) -> None:
    from channels.delivery import hold
    from channels.outbound_cap import OutboundCappedError
    from channels.sms.delivery import deliver_sms

    old = Reply(job_id="sms-old", channel="sms", reply_to=fresh_number(), text="late",
                model="echo", engine="echo",
                created_at=datetime.now(UTC) - timedelta(hours=4))  # fmt: skip
    outcome = hold(deliver_sms, old, OutboundCappedError("sms", 600), 4 * HOUR, client)
    assert outcome == {"status": "dropped (outbound cap)"}
    dropped = (("channel", "sms"), ("reason", "capped"))
    assert metric_values(web)[("gpt4p_delivery_failures_total", dropped)] >= 1


# --- 6: no number, address or text in Flower's events or in stored results -----------------


@dataclass
class EventStream:
    """Every Celery event of the stack, as Flower receives them."""

    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, event: dict[str, Any]) -> None:
        """Keep one event (called by the receiver's thread)."""
        with self.lock:
            self.events.append(dict(event))

    def of(self, task_id: str) -> list[dict[str, Any]]:
        """The events of one task, in order."""
        with self.lock:
            return [e for e in self.events if e.get("uuid") == task_id]

    def types(self, task_id: str) -> list[str]:
        """The types of one task's events, in order."""
        return [str(e["type"]) for e in self.of(task_id)]


@pytest.fixture(scope="module")
def task_events(app: Celery, web: str) -> Iterator[EventStream]:
    """A real event receiver (what Flower runs) on the stack's Redis, in a thread."""
    stream = EventStream()
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": stream.add})
        capture = {"limit": None, "timeout": None, "wakeup": True}
        thread = threading.Thread(target=receiver.capture, kwargs=capture, daemon=True)
        thread.start()
        wait_for(lambda: any(e["type"] == "worker-heartbeat" for e in stream.events), 30,
                 "the first worker heartbeat event")  # fmt: skip
        yield stream
        receiver.should_stop = True
        thread.join(10)


def test_a_retried_delivery_shows_no_number_or_text_in_events_or_stored_results(
    web: str, twilio: TwilioRecorder, client: redis.Redis, task_events: EventStream
) -> None:
    number, secret, sid = fresh_number(), "my secret diagnosis is flu", new_sid()
    job, delivery = f"sms-{sid}", f"sms-{sid}.deliver"
    twilio.fail(number, (500, None), (503, None))  # two retries of the delivery task
    assert text(web, twilio, number, secret, sid=sid).status_code == 200
    assert replies(twilio, number, 1) == [secret]
    wait_for(lambda: "task-succeeded" in task_events.types(delivery)
             and "task-succeeded" in task_events.types(job), 30,
             "the events of the job and of its delivery")  # fmt: skip
    wait_for(lambda: settled(client, job), 30, "the job to settle")
    assert task_events.types(delivery).count("task-received") == 3  # first try, two retries
    shown = task_events.of(job) + task_events.of(delivery)
    listed = {(e["type"], e["args"], e["kwargs"]) for e in shown if "args" in e}
    # (No "task-sent" events: celeryconfig leaves them off; a receipt shows the arguments.)
    assert listed == {
        ("task-received", f"<job {job} via sms, 2 message(s)>", "{}"),
        ("task-received", f"<reply to job {job} via sms>", "{}"),
    }
    for event in shown:
        seen = json.dumps(event, default=str)
        assert number[1:] not in seen and secret not in seen, event["type"]
    metas = {key: client.get(key) for key in client.scan_iter(match=f"{RESULT_KEY_PREFIX}*")}
    assert {RESULT_KEY_PREFIX + job, RESULT_KEY_PREFIX + delivery} <= {k.decode() for k in metas}
    for key, raw in metas.items():
        assert raw is not None
        assert number[1:].encode() not in raw and secret.encode() not in raw, key


# --- 15: a signed webhook replayed after the dedup window --------------------------------


def a_week_passes(client: redis.Redis) -> None:
    """What seven days do to Redis: keys expiring within them are gone, the rest aged."""
    for key in list(client.scan_iter(count=1000)):
        ttl = client.ttl(key)
        if 0 <= ttl <= WEEK:
            client.delete(key)
        elif ttl > WEEK:
            client.expire(key, ttl - WEEK)


def test_a_signed_webhook_replayed_after_a_week_is_not_answered_again(
    web: str, twilio: TwilioRecorder, client: redis.Redis
) -> None:
    number, sid = fresh_number(), new_sid()
    url = f"{web}/sms"
    form, headers = twilio.webhook(url, number, "Answer me once", sid)  # captured on the way
    assert httpx.post(url, data=form, headers=headers, timeout=30).status_code == 200
    assert replies(twilio, number, 1) == ["Answer me once"]
    wait_for(lambda: settled(client, f"sms-{sid}"), 30, "the first answer to settle")
    assert client.keys("gpt4p:idem:*")  # the dedup of the job itself, which lasts 7 days
    a_week_passes(client)
    assert not client.keys("gpt4p:idem:*")
    duplicates = ("gpt4p_webhook_duplicates_total", (("channel", "sms"),))
    before = metric_values(web).get(duplicates, 0.0)
    replayed = httpx.post(url, data=form, headers=headers, timeout=30)
    assert replayed.status_code == 200
    assert "<Response" in replayed.text and "<Message" not in replayed.text
    wait_for(lambda: settled(client, f"sms-{sid}"), 30, "a replayed job, if any, to settle")
    assert twilio.delivered(number) == ["Answer me once"]
    assert metric_values(web)[duplicates] == before + 1
