"""WhatsApp through Twilio end to end: signed webhooks in, what Twilio's API receives out.

One stack for the module, on its own Redis database: a real echo inference
worker, a real delivery worker (its twilio client pointed at the recorder)
and the web app under uvicorn, configured with a WhatsApp sender. The echo
engine answers with the text of the message, so what reaches Twilio shows
exactly what was answered and how it was written.
"""

from __future__ import annotations

import base64
import itertools
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from twilio.request_validator import RequestValidator

from channels.sms.state import number_id
from channels.web import create_app
from channels.whatsapp.webhook import HELP_TEXT
from gpt4people.redis_server import RedisServer, free_port
from kernel.contract import Reply
from kernel.keys import IDEMPOTENCY_PREFIX
from tests.channels.test_http import metric_values
from tests.channels.test_sms import new_sid, replies
from tests.channels.twilio_recorder import OUR_NUMBER, TwilioRecorder
from tests.conftest import (
    base_env,
    emptied_database,
    queued_jobs,
    redis_url,
    settings_of,
    start_web,
    start_worker,
    stop_process,
    wait_for,
)
from workers.app import celery_for
from workers.client import enqueue_delivery

DB_WHATSAPP = 24  # this module's Redis database (the session's Redis has 32)
OUR_WHATSAPP = f"whatsapp:{OUR_NUMBER}"  # the WhatsApp number people write to
SENDER = "whatsapp:+14155238886"  # GPT4P_TWILIO_WHATSAPP_FROM: replies come from it
ECHO, DELIVER = "wa-echo@test", "wa-deliver@test"
RATE_LIMIT = 5
PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)

_numbers = itertools.count(1)


@pytest.fixture
def number() -> str:
    """A WhatsApp sender no other test writes from."""
    return f"whatsapp:+1556{next(_numbers):07d}"


@pytest.fixture(scope="module")
def wa_env(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, twilio: TwilioRecorder
) -> dict[str, str]:
    """Settings of the module's processes: echo engine, Twilio pointed at the recorder."""
    return base_env(
        tmp_path_factory.mktemp("whatsapp"),
        redis_url=redis_url(redis_server, DB_WHATSAPP),
        engine="echo",
        **twilio.settings(),
        twilio_whatsapp_from=SENDER,
        public_url=f"http://127.0.0.1:{free_port()}",  # the web app's, for pictures sent back
        sms_retry_backoff="0.1",
        sms_rate_limit=str(RATE_LIMIT),
        sms_max_inbound_chars="8000",
        whatsapp_max_tokens="4096",
        max_prompt_chars="100000",
    )


@pytest.fixture(scope="module")
def wa_redis(wa_env: dict[str, str]) -> Iterator[redis.Redis]:
    """A client of the module's database, emptied before and after the module."""
    with emptied_database(wa_env["GPT4P_REDIS_URL"]) as client:
        yield client


@pytest.fixture(scope="module")
def wa_web(wa_env: dict[str, str], wa_redis: redis.Redis) -> Iterator[str]:
    """The web app, an echo inference worker and a delivery worker; yields the base URL."""
    base = wa_env["GPT4P_PUBLIC_URL"]
    inference = start_worker(wa_env, ECHO)
    deliver = start_worker(wa_env, DELIVER, command="deliver")
    web = start_web(wa_env, int(base.rsplit(":", 1)[1]))
    yield base
    for process in (web, deliver, inference):
        stop_process(process)


@pytest.fixture(scope="module")
def wa_celery(wa_env: dict[str, str]) -> Iterator[Celery]:
    """A Celery app on the module's broker, to hand replies to the delivery worker."""
    app = celery_for(settings_of(wa_env))
    yield app
    app.close()


def write(
    base: str, twilio: TwilioRecorder, sender: str, body: str, sid: str | None = None,
    path: str = "/whatsapp", signed_for: str | None = None, **extra: str,
) -> httpx.Response:  # fmt: skip
    """Post the webhook Twilio posts when `sender` writes `body` on WhatsApp, signed for
    the URL posted to (or for `signed_for`)."""
    url = f"{base}{path}"
    params, headers = twilio.webhook(signed_for or url, sender, body, sid or new_sid(),
                                     **{"To": OUR_WHATSAPP, **extra})  # fmt: skip
    return httpx.post(url, data=params, headers=headers, timeout=30)


def wait_idle(client: redis.Redis) -> None:
    """Wait until no job or delivery is queued, reserved or scheduled for retry."""

    def idle() -> bool:
        queued = queued_jobs(client) + client.llen("deliver.whatsapp")
        return queued == 0 and client.hlen("unacked") == 0

    wait_for(idle, 30, "the queues to drain")


def window_closed_count(base: str) -> float:
    """gpt4p_delivery_failures_total of WhatsApp replies not sent outside the window."""
    labels = (("channel", "whatsapp"), ("reason", "window_closed"))
    return metric_values(base).get(("gpt4p_delivery_failures_total", labels), 0.0)


def last_wrote(client: redis.Redis, number: str, hours_ago: float) -> None:
    """Record that `number` last wrote `hours_ago` hours ago, as the webhook records it."""
    client.set(f"gpt4p:whatsapp:inbound:{number_id(number)}", repr(time.time() - hours_ago * 3600))


def reply_to(number: str, text: str, **context: str) -> Reply:
    """A reply on its way to `number` (as the inference worker hands it over)."""
    return Reply(job_id=f"whatsapp-{uuid.uuid4().hex}", channel="whatsapp", reply_to=number,
                 reply_from=OUR_WHATSAPP, text=text, model="echo", engine="echo",
                 context=context)  # fmt: skip


def test_a_message_is_answered_from_the_whatsapp_sender_to_the_whatsapp_number(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis
) -> None:
    response = write(wa_web, twilio, number, "What is the capital of France?",
                     ProfileName="Ann", WaId=number.removeprefix("whatsapp:+"))  # fmt: skip
    assert response.status_code == 200
    assert "<Response" in response.text and "<Message" not in response.text
    assert replies(twilio, number, 1) == ["What is the capital of France?"]
    call = twilio.attempts(number)[0]
    assert (call.form["From"], call.form["To"]) == (SENDER, number)
    assert call.account == twilio.account_sid
    # The person's records are WhatsApp's own: nothing under SMS's keys, no number in clear.
    history = f"gpt4p:whatsapp:history:{number_id(number)}"
    wait_for(lambda: wa_redis.llen(history) == 2, 10, "the exchange to be remembered")
    assert 0 < wa_redis.ttl(f"gpt4p:whatsapp:inbound:{number_id(number)}") <= 24 * 3600
    assert list(wa_redis.scan_iter("gpt4p:sms:*")) == []
    assert not any(number[10:].encode() in key for key in wa_redis.keys("gpt4p:*"))


def test_markdown_reaches_whatsapp_in_its_own_formatting(
    wa_web: str, twilio: TwilioRecorder, number: str
) -> None:
    answer = "## Paris\n\n**Paris** is the `capital`:\n\n* since _508_\n* [map](https://x.org/p)"
    assert write(wa_web, twilio, number, answer).status_code == 200
    assert replies(twilio, number, 1) == [
        "*Paris*\n*Paris* is the `capital`:\n\n- since _508_\n- map (https://x.org/p)"
    ]


def test_a_retried_webhook_is_answered_once(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis
) -> None:
    sid = new_sid()
    for _ in range(3):
        assert write(wa_web, twilio, number, "Only once please", sid=sid).status_code == 200
    replies(twilio, number, 1)
    wait_idle(wa_redis)
    assert twilio.delivered(number) == ["Only once please"]


@pytest.mark.parametrize(
    "forgery", ["unsigned", "wrong token", "other account", "signed for /sms", "sms sender"]
)
def test_a_forged_webhook_is_refused_and_nothing_is_queued(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis, forgery: str
) -> None:
    sid = new_sid()
    params = {"MessageSid": sid, "AccountSid": twilio.account_sid, "From": number,
              "To": OUR_WHATSAPP, "Body": "forged", "NumMedia": "0"}  # fmt: skip
    url, token = f"{wa_web}/whatsapp", twilio.auth_token
    if forgery == "wrong token":
        token = "not-the-token"
    elif forgery == "other account":
        params["AccountSid"] = "AC" + "9" * 32
    elif forgery == "signed for /sms":  # a signature for another of our URLs
        url = f"{wa_web}/sms"
    elif forgery == "sms sender":  # signed, but not a WhatsApp message: 400, not 403
        params["From"] = number.removeprefix("whatsapp:")
    signature = RequestValidator(token).compute_signature(url, params)
    headers = {} if forgery == "unsigned" else {"X-Twilio-Signature": signature}
    response = httpx.post(f"{wa_web}/whatsapp", data=params, headers=headers, timeout=30)
    assert response.status_code == (400 if forgery == "sms sender" else 403)
    assert wa_redis.exists(f"{IDEMPOTENCY_PREFIX}whatsapp:{sid}") == 0  # never became a job
    assert write(wa_web, twilio, number, "genuine").status_code == 200
    replies(twilio, number, 1)
    wait_idle(wa_redis)
    assert twilio.delivered(number) == ["genuine"]


def test_a_long_answer_is_split_into_numbered_messages_of_1600(
    wa_web: str, twilio: TwilioRecorder, number: str
) -> None:
    sentence = "The quick brown fox jumps over the lazy dog near the river bank. "
    body = (sentence * 50).strip()  # 3,249 characters: three messages
    assert write(wa_web, twilio, number, body).status_code == 200
    parts = replies(twilio, number, 3)
    assert [p[:6] for p in parts] == ["(1/3) ", "(2/3) ", "(3/3) "]
    assert all(len(p) <= 1600 for p in parts)
    assert " ".join(p[6:] for p in parts) == body


def test_a_whatsapp_message_posted_to_the_sms_webhook_is_handled_as_whatsapp(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis
) -> None:
    # Twilio signs the URL it calls: /sms, where this sender's webhook points.
    forged = write(wa_web, twilio, number, "signed for another URL", path="/sms",
                   signed_for=f"{wa_web}/whatsapp")  # fmt: skip
    assert forged.status_code == 403
    assert write(wa_web, twilio, number, "Through /sms", path="/sms").status_code == 200
    assert replies(twilio, number, 1) == ["Through /sms"]
    assert twilio.attempts(number)[0].form["From"] == SENDER
    history = f"gpt4p:whatsapp:history:{number_id(number)}"
    wait_for(lambda: wa_redis.llen(history) == 2, 10, "the exchange to be remembered")
    assert list(wa_redis.scan_iter("gpt4p:sms:*")) == []


def test_stop_silences_the_sender_until_start_and_help_answers_without_the_model(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis
) -> None:
    assert write(wa_web, twilio, number, "STOP").status_code == 200
    assert write(wa_web, twilio, number, "Are you there?").status_code == 200
    wait_idle(wa_redis)
    assert twilio.attempts(number) == []
    assert write(wa_web, twilio, number, "start").status_code == 200
    assert write(wa_web, twilio, number, "help").status_code == 200
    assert write(wa_web, twilio, number, "Back again").status_code == 200
    assert sorted(replies(twilio, number, 2)) == sorted([HELP_TEXT, "Back again"])


def test_a_sender_over_the_rate_limit_gets_one_notice_then_silence(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis
) -> None:
    for i in range(RATE_LIMIT + 2):
        assert write(wa_web, twilio, number, f"message {i}").status_code == 200
    replies(twilio, number, RATE_LIMIT + 1)
    wait_idle(wa_redis)
    assert len(twilio.delivered(number)) == RATE_LIMIT + 1


def test_a_reply_outside_the_24_hour_window_is_not_sent_and_is_counted(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis,
    wa_celery: Celery, wa_env: dict[str, str],
) -> None:  # fmt: skip
    # The person last wrote 25 hours ago; the answer comes only now (a long outage).
    last_wrote(wa_redis, number, hours_ago=25)
    before = window_closed_count(wa_web)
    late = reply_to(number, "Sorry for the wait")
    enqueue_delivery(wa_celery, wa_redis, late)
    result = wa_celery.AsyncResult(f"{late.job_id}.deliver").get(timeout=30)
    assert result == {"sent": 0, "status": "window_closed"}
    assert window_closed_count(wa_web) == before + 1
    assert twilio.attempts(number) == []
    log = (Path(wa_env["GPT4P_STATE_DIR"]) / f"{DELIVER}.log").read_text()
    assert f"{late.job_id} to {number_id(number)} not sent" in log
    assert "approved message template" in log
    # 23 hours after their last message the window is still open: the same reply goes.
    last_wrote(wa_redis, number, hours_ago=23)
    enqueue_delivery(wa_celery, wa_redis, reply_to(number, "Sorry for the wait"))
    assert replies(twilio, number, 1) == ["Sorry for the wait"]


def test_a_helpers_picture_goes_with_the_first_message(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis, wa_celery: Celery
) -> None:
    last_wrote(wa_redis, number, hours_ago=0)
    picture = base64.b64encode(PNG).decode()
    long_text = "A cat on a mat, drawn as asked. " * 60  # two messages
    drawn = reply_to(number, long_text, image_base64=picture, image_type="image/png")
    enqueue_delivery(wa_celery, wa_redis, drawn)
    replies(twilio, number, 2)
    first, second = twilio.attempts(number)
    assert first.form["MediaUrl"].startswith(f"{wa_web}/media/")
    assert "MediaUrl" not in second.form
    fetched = httpx.get(first.form["MediaUrl"], timeout=10)  # as Twilio fetches it
    assert (fetched.status_code, fetched.headers["content-type"]) == (200, "image/png")
    assert fetched.content == PNG


def test_a_picture_sent_on_whatsapp_rides_on_the_job(
    wa_web: str, twilio: TwilioRecorder, number: str
) -> None:
    write(wa_web, twilio, number, "", NumMedia="1", MediaUrl0=f"{twilio.url}/media/x.jpg",
          MediaContentType0="image/jpeg")  # fmt: skip
    # No image helper runs in this stack: the core says so instead of guessing.
    assert "can't look at pictures" in replies(twilio, number, 1)[0]


def test_numbers_names_and_messages_stay_out_of_the_logs(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis,
    wa_env: dict[str, str],
) -> None:  # fmt: skip
    secret, name = "my secret diagnosis is flu", "Annabel Q. Secretname"
    digits = number.removeprefix("whatsapp:+")
    write(wa_web, twilio, number, secret, ProfileName=name, WaId=digits)
    replies(twilio, number, 1)
    wait_idle(wa_redis)
    state_dir = Path(wa_env["GPT4P_STATE_DIR"])
    logs = [state_dir / f"{DELIVER}.log", state_dir / f"{ECHO}.log",
            *state_dir.glob("web-*.log")]  # fmt: skip
    for log in logs:
        content = log.read_text()
        for private in (digits, secret, name):
            assert private not in content, log.name
    assert number_id(number) in (state_dir / f"{DELIVER}.log").read_text()


def test_a_message_written_during_a_redis_outage_is_spooled_and_answered_once(
    wa_web: str, wa_env: dict[str, str], twilio: TwilioRecorder, number: str,
    wa_redis: redis.Redis, tmp_path: Path,
) -> None:  # fmt: skip
    # A Redis host that died without closing its connections: it accepts and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    up = settings_of(dict(wa_env, GPT4P_STATE_DIR=str(tmp_path)))
    down = up.model_copy(update={"redis_url": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"})
    params, headers = twilio.webhook(f"{wa_web}/whatsapp", number, "Anyone there?", new_sid(),
                                     To=OUR_WHATSAPP)  # fmt: skip
    try:
        with TestClient(create_app(down)) as web:
            started = time.monotonic()
            assert web.post("/whatsapp", data=params, headers=headers).status_code == 200
            assert time.monotonic() - started < 15  # within Twilio's wait for the webhook
            assert len(web.app.state.spool) == 1
    finally:
        silent.close()
    # Redis answers again: the web app hands the spooled message over, and it is answered.
    with TestClient(create_app(up)) as web:
        assert replies(twilio, number, 1) == ["Anyone there?"]
        wait_for(lambda: len(web.app.state.spool) == 0, 10, "the spool to be emptied")
        # Twilio posting the same message again now is a duplicate, not a second answer.
        assert web.post("/whatsapp", data=params, headers=headers).status_code == 200
    wait_idle(wa_redis)
    assert twilio.delivered(number) == ["Anyone there?"]


def test_twilios_own_window_refusal_is_not_retried_and_tells_the_operator(
    wa_web: str, twilio: TwilioRecorder, number: str, wa_redis: redis.Redis,
    wa_env: dict[str, str],
) -> None:  # fmt: skip
    # Twilio's error 63016: our record said the window was open (a message handed over
    # from the spool long after it came), Twilio knows better.
    twilio.fail(number, (400, 63016))
    assert write(wa_web, twilio, number, "Still there?").status_code == 200
    wait_for(lambda: twilio.attempts(number), 30, "the send attempt")
    wait_idle(wa_redis)
    assert [c.status for c in twilio.attempts(number)] == [400]
    log = (Path(wa_env["GPT4P_STATE_DIR"]) / f"{DELIVER}.log").read_text()
    assert "refused by Twilio: the window is closed" in log


def test_a_message_spooled_during_a_long_outage_opens_no_window_when_drained(
    wa_env: dict[str, str], wa_redis: redis.Redis, wa_celery: Celery, number: str,
    tmp_path: Path, twilio: TwilioRecorder,
) -> None:  # fmt: skip
    from channels.sms.spool import InboundSpool
    from channels.sms.webhook import drain_spool
    from channels.whatsapp.state import WhatsAppState

    settings = settings_of(wa_env)
    spool = InboundSpool(tmp_path / "spool.sqlite")
    params, _ = twilio.webhook("http://x/whatsapp", number, "hello", new_sid(),
                               To=OUR_WHATSAPP)  # fmt: skip
    spool.put("whatsapp", params)
    # Accepted 30 hours ago, while Redis was down; handed over only now.
    spool._db.execute("UPDATE inbound SET created = ?", (time.time() - 30 * 3600,))
    spool._db.commit()
    assert drain_spool(spool, settings, wa_redis, wa_celery) == 1
    assert WhatsAppState(wa_redis, settings).window_left(number) == 0  # the reply won't go
    # Within the window the drained message opens it from when it came, not from now.
    params, _ = twilio.webhook("http://x/whatsapp", number, "again", new_sid(),
                               To=OUR_WHATSAPP)  # fmt: skip
    spool.put("whatsapp", params)
    spool._db.execute("UPDATE inbound SET created = ?", (time.time() - 20 * 3600,))
    spool._db.commit()
    assert drain_spool(spool, settings, wa_redis, wa_celery) == 1
    left = WhatsAppState(wa_redis, settings).window_left(number)
    assert 3.5 * 3600 < left < 4.5 * 3600
    spool.close()


def test_spooled_items_no_one_drains_never_hold_up_the_others(
    wa_env: dict[str, str], wa_redis: redis.Redis, wa_celery: Celery, number: str,
    tmp_path: Path, twilio: TwilioRecorder,
) -> None:  # fmt: skip
    from channels.sms.spool import InboundSpool
    from channels.sms.webhook import drain_spool

    spool = InboundSpool(tmp_path / "spool.sqlite")
    for _ in range(101):  # of a channel since removed, or of another version
        spool.put("pigeon", {"coo": "coo"})
    params, _ = twilio.webhook("http://x/whatsapp", number, "hello", new_sid(),
                               To=OUR_WHATSAPP)  # fmt: skip
    spool.put("whatsapp", params)
    assert drain_spool(spool, settings_of(wa_env), wa_redis, wa_celery) == 1
    assert len(spool) == 101
    spool.close()
