"""Helpers on a public number: abuse paths of the outside review (issue 14: 2, 3, 10).

One stack for the module, on its own Redis database: the scripted inference
engine in ONE inference process (a slot a waiting helper would hold), the real
calc, image and time helpers, sample helpers that raise or run out of time,
helpers that ignore their time limit or kill their own process, one that runs
until the test releases it (a latch in Redis: the tests assert order, not time),
an SMS deliverer, the web app, and the Twilio recorder (serving MMS media and
counting the texts a person receives).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import redis
from celery import Celery
from PIL import Image

from gpt4people.redis_server import RedisServer, free_port
from helpers.sdk import HelperResult, helper
from kernel.contract import ChatMessage, Job, MediaRef, Reply
from kernel.helper_registry import Heartbeat, HelperRegistry
from kernel.keys import LEDGER_KEY, RESULT_KEY_PREFIX, UNACKED_KEY
from tests.channels.twilio_recorder import OUR_NUMBER, TwilioRecorder
from tests.conftest import (
    ROOT,
    base_env,
    emptied_database,
    ping_worker,
    redis_url,
    settings_of,
    start_web,
    start_worker,
    stop_process,
    wait_for,
)
from tests.helpers.conftest import start_helper
from tests.security.abusive_helpers import CRASH_RUNS_KEY, LATCH_PREFIX
from tests.security.conftest import DB_SEC_HELPERS
from workers.app import celery_for
from workers.client import enqueue_delivery, submit, wait_for_reply

HELPERS = {
    "calc": "calc", "image": "image", "time": "time",
    "boom": "tests.helpers.sample_helpers:boom", "slow": "tests.helpers.sample_helpers:slow",
    "stubborn": "tests.security.abusive_helpers:stubborn",
    "crash": "tests.security.abusive_helpers:crash",
    "held": "tests.security.abusive_helpers:held",
}  # fmt: skip
INFERENCE = "scripted@sec-helpers"
DELIVERER = "deliver@sec-helpers"
RATE_LIMIT = 8
# Peak resident memory (VmHWM) of the image helper's pool process after a decompression
# bomb: the interpreter, Pillow and Celery take about 80 MB (77 MB measured); decoding
# the bomb's 8944x8944 RGBA pixels took the process to 472 MB before the fix.
IMAGE_RSS_BOUND_KB = 120 * 1024
PNG_BASE64 = b"iVBORw0KGgo"  # how every PNG starts, in base64
# What Celery stores for a task that failed because Redis was away: no answer (the
# ledger sends the task again).
OUTAGE_FAILURE = {"status": "FAILURE", "traceback": None, "children": [], "result": {
    "exc_type": "ConnectionError", "exc_module": "redis.exceptions",
    "exc_message": ["Connection refused"]}}  # fmt: skip


@pytest.fixture(scope="module")
def env(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, twilio: TwilioRecorder
) -> dict[str, str]:
    """Settings of the module's processes: one inference process, tools offered, short TTLs."""
    state = tmp_path_factory.mktemp("sec-helpers")
    return base_env(
        state, redis_url=redis_url(redis_server, DB_SEC_HELPERS), engine="scripted",
        model_tools="true", worker_concurrency="1", helper_ttl="3", worker_heartbeat_ttl="1",
        helper_rate_limit=str(RATE_LIMIT), helper_rate_window="604800", **twilio.settings(),
    )  # fmt: skip


def start_sms_deliverer(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`gpt4people deliver --channels sms` (email deliveries stay queued, for inspection)."""
    log = open(Path(env["GPT4P_STATE_DIR"]) / f"{DELIVERER}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "deliver", "--channels", "sms", "--hostname",
         DELIVERER, "--concurrency", "1"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        ready = lambda: ping_worker(env["GPT4P_REDIS_URL"], DELIVERER, settings_of(env))  # noqa: E731
        wait_for(ready, 120, "the SMS deliverer to answer pings", every=0.5)
    except BaseException:
        stop_process(process)
        raise
    return process


@pytest.fixture(scope="module")
def client(env: dict[str, str]) -> Iterator[redis.Redis]:
    """A client of the module's Redis database, empty at the start and at the end."""
    with emptied_database(env["GPT4P_REDIS_URL"]) as client:
        yield client


@pytest.fixture(scope="module")
def stack(env: dict[str, str], client: redis.Redis) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Every helper registered and live, the inference worker and the SMS deliverer."""
    processes = {n: start_helper(env, n, target, "sec-helpers") for n, target in HELPERS.items()}
    registry = HelperRegistry(client, ttl=3)
    try:
        processes["inference"] = start_worker(env, INFERENCE)
        processes["deliverer"] = start_sms_deliverer(env)
        live = lambda: {h.name for h in registry.live()} >= set(HELPERS)  # noqa: E731
        wait_for(live, 120, "every helper to register", every=0.2)
        yield processes
    finally:
        for process in processes.values():  # all at once: each takes seconds to stop
            process.terminate()
        for process in processes.values():
            stop_process(process)


@pytest.fixture(scope="module")
def web(stack: object, env: dict[str, str]) -> Iterator[str]:
    """The web app in front of the stack; yields its base URL."""
    port = free_port()
    process = start_web(env, port)
    yield f"http://127.0.0.1:{port}"
    stop_process(process)


@pytest.fixture(scope="module")
def app(env: dict[str, str]) -> Iterator[Celery]:
    """A client Celery app of the module's Redis."""
    app = celery_for(settings_of(env))
    yield app
    app.close()


def job(prompt: str, user: str, channel: str = "cli", media: list[MediaRef] | None = None) -> Job:
    """A job as a channel makes it."""
    return Job(channel=channel, user=user, reply_to=user,
               messages=[ChatMessage(role="user", content=prompt)], media=media or [])  # fmt: skip


def ask(app: Celery, the_job: Job, timeout: float = 90) -> str:
    """Submit `the_job` and wait for its reply's text."""
    submit(app, the_job)
    return wait_for_reply(app, the_job.id, timeout).text


def openai_client(web: str) -> openai.OpenAI:
    """The official OpenAI client on the web app."""
    return openai.OpenAI(base_url=f"{web}/v1", api_key="x", timeout=90, max_retries=0)


def png(width: int, height: int) -> bytes:
    """A small real PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, declared: str = "image/png") -> str:
    """An inline picture."""
    return f"data:{declared};base64," + base64.b64encode(data).decode()


def answered(client: redis.Redis, job_id: str) -> bool:
    """Whether the reply to `job_id` is stored (where every channel waits for it)."""
    raw = cast(bytes | None, client.get(RESULT_KEY_PREFIX + job_id))
    return raw is not None and json.loads(raw)["status"] == "SUCCESS"


def helper_running(client: redis.Redis, name: str) -> bool:
    """Whether a helper worker holds a call of helper `name` (taken, not yet acknowledged)."""
    held = cast(list[bytes], client.hvals(UNACKED_KEY))
    return any(json.loads(raw)[2] == f"helper.{name}" for raw in held)


def result_keys_holding_pictures(client: redis.Redis) -> list[str]:
    """The stored Celery results that hold PNG bytes."""
    keys = cast(list[bytes], list(client.scan_iter(RESULT_KEY_PREFIX + "*")))
    return [k.decode() for k in keys if PNG_BASE64 in cast(bytes, client.get(k) or b"")]


# --- 2: helpers as a denial of service ---------------------------------------------------


def test_calc_refuses_a_number_too_large_to_write_before_computing_it(web: str) -> None:
    # 30 bytes that ran 5 s into the time limit (50 s of CPU without it), holding a slot.
    completion = openai_client(web).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "/calc (2**-1000)**19"}]
    )
    assert completion.choices[0].message.content == (
        "calc: that number is too large to write out (more than 1000 digits)"
    )


def test_image_refuses_a_picture_too_large_to_make_before_making_it(web: str) -> None:
    # A 1.7 KB picture asked to become 4096x4096 ran into the 20 s time limit.
    completion = openai_client(web).chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "resize 4096x4096"},
            {"type": "image_url", "image_url": {"url": data_url(png(24, 24))}},
        ]}],
    )  # fmt: skip
    assert completion.choices[0].message.content == (
        "image: the result would be 4096×4096 pixels; I make pictures of at most "
        "4,194,304 pixels (e.g. 2048×2048)"
    )


@pytest.mark.parametrize(
    ("prompt", "reply"),
    [("/held named", "released named"),
     ("use held for by_the_model", "The answer is released by_the_model.")],
    ids=["named", "called-by-the-model"],
)  # fmt: skip
def test_the_only_inference_slot_answers_others_while_a_helper_runs(
    app: Celery, client: redis.Redis, stack: object, prompt: str, reply: str
) -> None:
    latch = LATCH_PREFIX + prompt.split()[-1]
    waiting = job(prompt, user=f"waiting-{len(prompt)}")
    submit(app, waiting)
    wait_for(lambda: helper_running(client, "held"), 60, "the held helper to start")
    # The helper runs until the latch is released, after this answer: a slot waiting
    # for the helper could never give it (the ask would time out).
    assert ask(app, job("hello, anyone there?", user="bystander")) == "hello, anyone there?"
    assert not answered(client, waiting.id)
    client.rpush(latch, "go")
    assert wait_for_reply(app, waiting.id, 90).text == reply
    # Answered once and struck from the ledger: recovery has nothing to replay.
    wait_for(lambda: not client.hexists(LEDGER_KEY, waiting.id), 10, "the ledger entry")


@pytest.mark.parametrize(
    ("name", "reply"),
    [("boom", "Sorry, the boom helper could not do that."),
     ("slow", "Sorry, the slow helper took too long."),
     ("stubborn", "Sorry, the stubborn helper took too long."),
     ("crash", "Sorry, the crash helper could not do that.")],
    ids=["raises", "soft-time-limit", "hard-time-limit", "killed"],
)  # fmt: skip
def test_a_helper_that_fails_in_any_way_gets_one_polite_reply(
    app: Celery, client: redis.Redis, stack: object, name: str, reply: str
) -> None:
    crashes = int(client.get(CRASH_RUNS_KEY) or 0)
    failing = job(f"/{name} now", user=f"victim-of-{name}")
    assert ask(app, failing) == reply
    wait_for(lambda: not client.hexists(LEDGER_KEY, failing.id), 10, "the ledger entry")
    if name == "crash":  # killed, not requeued to kill every process it reaches
        assert int(client.get(CRASH_RUNS_KEY) or 0) == crashes + 1


def texted(prompt: str, number: str) -> Job:
    """The job the SMS channel makes of a text from `number` to our number."""
    return Job(channel="sms", user=number, reply_to=number, reply_from=OUR_NUMBER,
               messages=[ChatMessage(role="user", content=prompt)])  # fmt: skip


def settled(client: redis.Redis, job_id: str) -> bool:
    """Nothing of the job is left to run: no message naming it (a continuation, a delivery)
    queued or held by a worker, and nothing of it in the ledger."""
    queued = [
        *client.lrange("inference", 0, -1),
        *client.lrange("inference.interactive", 0, -1),
        *client.lrange("deliver.sms", 0, -1),
    ]
    held = cast(list[bytes], [*queued, *client.hvals(UNACKED_KEY)])
    pending = any(job_id.encode() in raw for raw in held)
    entries = client.hexists(LEDGER_KEY, job_id) or client.hexists(LEDGER_KEY, f"{job_id}.deliver")
    return not pending and not entries


@pytest.mark.parametrize(
    ("name", "number", "reply"),
    [("stubborn", "+15550007701", "Sorry, the stubborn helper took too long."),
     ("crash", "+15550007702", "Sorry, the crash helper could not do that.")],
    ids=["hard-time-limit", "killed"],
)  # fmt: skip
def test_a_killed_helper_gets_one_text_back_however_often_its_failure_is_reported(
    app: Celery, client: redis.Redis, stack: object, twilio: TwilioRecorder, name: str,
    number: str, reply: str,
) -> None:  # fmt: skip
    # Celery reports a hard time limit to the errback twice: two follow-ups of one job.
    texting = texted(f"/{name} now", number)
    submit(app, texting)
    wait_for(lambda: twilio.delivered(number), 90, "the reply text")
    wait_for(lambda: settled(client, texting.id), 60, "every follow-up and delivery to run")
    assert twilio.delivered(number) == [reply]
    # Two follow-ups running at once (two inference processes) both store the reply and
    # hand on the job's one delivery: the second hand-off sends nothing more.
    again = texting.reply(reply, name, "helper", finish_reason="fallback")
    enqueue_delivery(app, client, again)
    wait_for(lambda: settled(client, texting.id), 60, "the second delivery to run")
    assert twilio.delivered(number) == [reply]


def test_a_failure_stored_during_a_redis_outage_does_not_stop_the_helpers_answer(
    app: Celery, client: redis.Redis, stack: object, twilio: TwilioRecorder
) -> None:
    # A task of the job failed because Redis was away (stored when Redis came back): not
    # an answer. The helper's own answer must still reach the person.
    number = "+15550007710"
    texting = texted("/held after_an_outage", number)
    submit(app, texting)
    wait_for(lambda: helper_running(client, "held"), 60, "the held helper to start")
    outage = json.dumps({**OUTAGE_FAILURE, "task_id": texting.id})
    client.set(RESULT_KEY_PREFIX + texting.id, outage)
    client.rpush(LATCH_PREFIX + "after_an_outage", "go")
    wait_for(lambda: twilio.delivered(number), 90, "the reply text")
    wait_for(lambda: settled(client, texting.id), 60, "every follow-up and delivery to run")
    assert twilio.delivered(number) == ["released after_an_outage"]


def test_a_helper_call_lost_from_redis_is_still_answered(
    app: Celery, client: redis.Redis, stack: object
) -> None:
    # Live in the registry, but its call is lost (taken off its queue, as a Redis crash
    # between BRPOP and the unacked record loses it): the ledger answers the job.
    lost = helper("lost", "Never runs.", time_limit=1)(lambda r: HelperResult(text="no"))
    registry = HelperRegistry(client, ttl=3)
    registry.register(lost, "lost@nowhere")
    beat = Heartbeat(registry, "lost", "lost@nowhere")
    beat.start()
    try:
        the_job = job("/lost anything", user="unlucky")
        submit(app, the_job)
        wait_for(lambda: client.lpop("helper.lost"), 30, "the helper call to be lost")
        assert wait_for_reply(app, the_job.id, 90).text == "Sorry, the lost helper took too long."
        wait_for(lambda: not client.hexists(LEDGER_KEY, the_job.id), 10, "the entry")
    finally:
        beat.stop()


def test_helper_calls_over_the_senders_limit_are_refused_without_running(
    app: Celery, stack: object
) -> None:
    for _ in range(RATE_LIMIT):
        assert ask(app, job("/time UTC", user="+15550009999", channel="sms_like")).startswith(
            "It is "
        )
    refused = ask(app, job("/time UTC", user="+15550009999", channel="sms_like"))
    assert refused == (
        "Sorry, you have asked the helpers too often. Please try again in a few minutes."
    )
    # Another sender, and the same one without a helper, are answered as ever.
    assert ask(app, job("/time UTC", user="+15550001111", channel="sms_like")).startswith("It is ")
    assert ask(app, job("plain words", user="+15550009999", channel="sms_like")) == "plain words"


def _ask_over_http(web: str, source: str, text: str, user: str) -> str:
    """One chat completion sent from the local address `source`, naming itself `user`."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=60) as http:
        body = {"messages": [{"role": "user", "content": text}], "user": user}
        response = http.post(f"{web}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return cast(str, response.json()["choices"][0]["message"]["content"])


def test_an_http_caller_cannot_dodge_the_helper_limit_by_naming_other_users(web: str) -> None:
    # Without API keys the sender is the client's address, not the request's `user` field,
    # which anyone can vary (loopback has many addresses: each is another client).
    caller, neighbour = "127.0.0.3", "127.0.0.4"
    for n in range(RATE_LIMIT):
        assert _ask_over_http(web, caller, "/time UTC", f"user-{n}").startswith("It is ")
    refused = _ask_over_http(web, caller, "/time UTC", "yet-another-user")
    assert refused.startswith("Sorry, you have asked the helpers too often")
    assert _ask_over_http(web, neighbour, "/time UTC", "user-0").startswith("It is ")


def test_a_streamed_helper_answer_arrives_whole(web: str) -> None:
    stream = openai_client(web).chat.completions.create(
        model="any", stream=True, messages=[{"role": "user", "content": "/calc 6*7"}]
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "42"
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- 3: helper results fill Redis ---------------------------------------------------------


def test_no_picture_is_made_or_stored_for_a_channel_that_cannot_carry_it(
    web: str, client: redis.Redis
) -> None:
    completion = openai_client(web).chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "resize 64x64"},
            {"type": "image_url", "image_url": {"url": data_url(png(16, 16))}},
        ]}],
    )  # fmt: skip
    assert completion.choices[0].message.content == (
        "Done: 64×64 pixels, RGB (from PNG image, 16×16 pixels, RGB). "
        "Pictures cannot be sent back on this channel; ask by email to receive it."
    )
    assert result_keys_holding_pictures(client) == []


def delivery_message(client: redis.Redis, queue: str, task_id: str) -> dict[str, Any]:
    """The arguments of the queued delivery task `task_id` (kombu's Redis message format)."""
    for raw in cast(list[bytes], client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        if message["properties"]["correlation_id"] == task_id:
            args, _, _ = json.loads(base64.b64decode(message["body"]))
            return cast(dict[str, Any], args[0])
    raise AssertionError(f"no delivery {task_id} in {queue}")


def test_the_picture_goes_to_an_email_reply_and_never_into_a_stored_result(
    app: Celery, client: redis.Redis, stack: object
) -> None:
    picture = MediaRef(url=data_url(png(16, 16)), content_type="image/png")
    the_job = job("resize 64x64", user="carol@example.org", channel="email", media=[picture])
    submit(app, the_job)
    wait_for(lambda: answered(client, the_job.id), 60, "the job to be answered")
    reply = Reply.model_validate(delivery_message(client, "deliver.email", f"{the_job.id}.deliver"))
    assert reply.text.startswith("Done: 64×64 pixels")
    attached = Image.open(io.BytesIO(base64.b64decode(reply.context["image_base64"])))
    assert attached.size == (64, 64)
    # The helper's own result was never stored; no stored result holds the picture.
    assert not client.exists(f"{RESULT_KEY_PREFIX}{the_job.id}.helper")
    assert result_keys_holding_pictures(client) == []


# --- 10: image decompression bomb -----------------------------------------------------------


def png_declaring(side: int) -> bytes:
    """A PNG whose header declares side x side RGBA pixels, all zero: tiny once compressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row, packer = bytes(1 + 4 * side), zlib.compressobj(9)  # filter byte + RGBA zeros
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def peak_rss_kb(helper_process: subprocess.Popen[bytes]) -> int:
    """The largest VmHWM of the helper's pool processes (the children of its worker)."""
    pid = helper_process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    peaks = []
    for child in children:
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]))
    assert peaks, "the image helper has no pool process"
    return max(peaks)


def test_a_decompression_bomb_sent_as_mms_is_refused_from_its_header(
    app: Celery, stack: dict[str, subprocess.Popen[bytes]], twilio: TwilioRecorder
) -> None:
    bomb = png_declaring(8944)
    assert len(bomb) < 400_000  # 310 KB on the wire, 320 MB once decoded
    twilio.media["bomb.png"] = (bomb, "image/png")
    picture = MediaRef(url=f"{twilio.url}/media/bomb.png", content_type="image/png")
    text = ask(app, job("what is this?", user="+15550004444", media=[picture]))
    assert text == (
        "image: that picture is too large: I open pictures of at most 16,777,216 pixels"
    )
    assert peak_rss_kb(stack["image"]) < IMAGE_RSS_BOUND_KB


def test_only_png_jpeg_gif_and_webp_are_opened_whatever_the_declared_type(
    app: Celery, stack: object
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, format="BMP")
    declared_png = MediaRef(url=data_url(buffer.getvalue()), content_type="image/png")
    text = ask(app, job("what is this?", user="+15550005555", media=[declared_png]))
    assert text == "image: I could not open that picture (I read PNG, JPEG, GIF and WEBP)"
    real = MediaRef(url=data_url(png(8, 8)), content_type="image/bmp")
    text = ask(app, job("what is this?", user="+15550005555", media=[real]))
    assert text == "PNG image, 8×8 pixels, RGB; no EXIF data."
