"""Pictures sent back: published under an unguessable link that expires, and sent by MMS.

One stack for the module, on its own Redis database: the web app (serving
``/media/<token>`` under GPT4P_PUBLIC_URL, with an API key set that the link must not
need), an echo inference worker, a delivery worker and the real image helper, with
Twilio played by the local recorder. Links are published here with `publish` against
the same Redis; the end-to-end tests text the webhook an MMS for ``/image``.
"""

from __future__ import annotations

import base64
import io
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
from PIL import Image

from channels.media_links import (
    MEDIA_PREFIX,
    PictureRefusedError,
    image_of,
    picture_link,
    publish,
    sniffed_type,
)
from gpt4people.redis_server import RedisServer, free_port
from kernel.contract import Reply
from kernel.helper_registry import HelperRegistry
from kernel.settings import Settings
from tests.channels.twilio_recorder import OUR_NUMBER, TwilioRecorder
from tests.conftest import base_env, redis_url, start_web, start_worker, stop_process, wait_for
from tests.helpers.conftest import start_helper

DB_MEDIA = 27  # this module's stack, on the session's Redis
TWILIO_TIMEOUT = 2  # a hung send is settled from Twilio's log after 2 + 5 s


def png(width: int, height: int, colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "blue").save(buffer, format="JPEG")
    return buffer.getvalue()


WHATSAPP_SENDER = "whatsapp:+14155238886"


@pytest.fixture(scope="module")
def media_env(redis_server: RedisServer, state_dir: Path, twilio: TwilioRecorder) -> dict[str, str]:
    port = free_port()
    return base_env(
        state_dir, redis_url=redis_url(redis_server, DB_MEDIA), engine="echo",
        **twilio.settings(), public_url=f"http://127.0.0.1:{port}", http_port=str(port),
        http_api_key="media-test-key-" + "k" * 24, twilio_timeout=str(TWILIO_TIMEOUT),
        sms_retry_backoff="0.5", twilio_whatsapp_from=WHATSAPP_SENDER,
    )  # fmt: skip


@pytest.fixture(scope="module")
def settings(media_env: dict[str, str]) -> Settings:
    """The stack's settings, as this test process publishes with them."""
    return Settings(redis_url=media_env["GPT4P_REDIS_URL"],
                    public_url=media_env["GPT4P_PUBLIC_URL"])  # fmt: skip


@pytest.fixture(scope="module")
def media_redis(media_env: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(media_env["GPT4P_REDIS_URL"])
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def stack(media_env: dict[str, str], media_redis: redis.Redis) -> Iterator[str]:
    """The web app, echo and delivery workers and the image helper; yields the public URL."""
    helper = start_helper(media_env, "image", "image", "media")
    processes = [helper]
    try:
        processes.append(start_worker(media_env, "media-echo@test"))
        processes.append(start_worker(media_env, "media-deliver@test", command="deliver"))
        processes.append(start_web(media_env, int(media_env["GPT4P_HTTP_PORT"])))
        registry = HelperRegistry(media_redis)
        wait_for(lambda: "image" in {h.name for h in registry.live()}, 90,
                 "the image helper to register", every=0.2)  # fmt: skip
        yield media_env["GPT4P_PUBLIC_URL"]
    finally:
        for process in processes:  # all at once: each takes a while to shut down
            if process.poll() is None:
                process.terminate()
        for process in processes:
            stop_process(process)


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def ttl_ms(client: redis.Redis, url: str) -> int:
    """Milliseconds the picture at `url` has left in Redis."""
    return cast(int, client.pttl(MEDIA_PREFIX + token_of(url)))


# --- publishing: what is kept, and what is refused ------------------------------------------


def test_a_published_png_comes_back_byte_for_byte_without_the_api_key(
    stack: str, settings: Settings, media_redis: redis.Redis
) -> None:
    picture = png(40, 30)
    url = publish(media_redis, settings, picture, "image/png")
    assert url.startswith(f"{stack}/media/")
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == picture
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    head = httpx.head(url, timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "image/png"
    assert httpx.get(url, timeout=10).content == picture  # served again: Twilio may refetch


def test_a_jpeg_declared_image_jpg_is_kept_as_a_jpeg(
    stack: str, settings: Settings, media_redis: redis.Redis
) -> None:
    url = publish(media_redis, settings, jpeg(8, 8), "image/jpg")
    assert httpx.get(url, timeout=10).headers["content-type"] == "image/jpeg"


def test_a_link_is_a_404_once_its_ttl_is_over_and_its_bytes_are_gone(
    stack: str, settings: Settings, media_redis: redis.Redis
) -> None:
    short = settings.model_copy(update={"media_ttl": 1})
    url = publish(media_redis, short, png(4, 4), "image/png")
    assert 0 < ttl_ms(media_redis, url) <= 1000
    wait_for(lambda: httpx.get(url, timeout=5).status_code == 404, 10, "the link to expire")
    assert not media_redis.exists(MEDIA_PREFIX + token_of(url))


def test_the_ttl_is_the_setting(settings: Settings, media_redis: redis.Redis) -> None:
    url = publish(media_redis, settings, png(4, 4), "image/png")
    assert 590_000 < ttl_ms(media_redis, url) <= 600_000


@pytest.mark.parametrize(
    "token",
    [secrets.token_urlsafe(32), "x", "a" * 44, "..%2F..%2Fetc%2Fpasswd", "gpt4p:media:x"],
)
def test_an_unknown_or_malformed_token_is_a_404(stack: str, token: str) -> None:
    response = httpx.get(f"{stack}/media/{token}", timeout=10)
    assert response.status_code == 404
    assert "image" not in response.headers["content-type"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_only_get_and_head_are_allowed(
    stack: str, settings: Settings, media_redis: redis.Redis, method: str
) -> None:
    url = publish(media_redis, settings, png(4, 4), "image/png")
    assert httpx.request(method, url, timeout=10).status_code == 405
    assert httpx.get(url, timeout=10).status_code == 200  # and it is still there


def test_tokens_are_32_random_bytes(settings: Settings, media_redis: redis.Redis) -> None:
    tokens = [token_of(publish(media_redis, settings, png(1, 1), "image/png")) for _ in range(200)]
    assert len(set(tokens)) == len(tokens)
    raw = [base64.urlsafe_b64decode(t + "=") for t in tokens]
    assert {len(t) for t in tokens} == {43} and {len(r) for r in raw} == {32}
    # 51,200 bits: a fair coin gives 50% ones within 1% (over 4 standard deviations).
    ones = sum(bin(byte).count("1") for r in raw for byte in r)
    assert abs(ones / (len(raw) * 256) - 0.5) < 0.01
    # Nothing about the picture or the time is in the link: the same bytes, new links.
    assert not any(t.startswith(tokens[0][:8]) for t in tokens[1:])


@pytest.mark.parametrize(
    ("data", "declared", "why"),
    [
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", "not a picture we send"),
        (b"<html><script>alert(1)</script></html>", "image/png", "not a picture we send"),
        (b"\xff\xd8\xff\xe0" + bytes(100), "image/png", "not a picture we send"),  # a JPEG
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "text/html", "not a picture we send"),
        (b"\x89PNG\r\n\x1a\n" + bytes(2000), "image/png", "larger than 1000 bytes"),
    ],
)
def test_other_types_and_oversized_pictures_are_refused_and_nothing_is_kept(
    settings: Settings, media_redis: redis.Redis, data: bytes, declared: str, why: str
) -> None:
    small = settings.model_copy(update={"media_max_bytes": 1000})
    before = set(media_redis.scan_iter(MEDIA_PREFIX + "*"))
    with pytest.raises(PictureRefusedError, match=why):
        publish(media_redis, small, data, declared)
    assert set(media_redis.scan_iter(MEDIA_PREFIX + "*")) == before


def test_nothing_is_published_without_a_public_url(media_redis: redis.Redis) -> None:
    with pytest.raises(PictureRefusedError, match="GPT4P_PUBLIC_URL"):
        publish(media_redis, Settings(), png(1, 1), "image/png")


def test_pictures_are_recognised_by_their_bytes() -> None:
    assert sniffed_type(png(1, 1)) == "image/png"
    assert sniffed_type(jpeg(1, 1)) == "image/jpeg"
    assert sniffed_type(b"GIF89a" + bytes(10)) == "image/gif"
    assert sniffed_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniffed_type(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniffed_type(b"") is None


# --- a reply's picture ----------------------------------------------------------------------


def reply_with(**context: str) -> Reply:
    return Reply(job_id=str(uuid.uuid4()), channel="sms", reply_to="+15551112222", text="Done",
                 model="image", engine="helper", context=context)  # fmt: skip


def test_the_picture_of_a_reply_is_its_helper_image() -> None:
    picture = png(2, 2)
    encoded = base64.b64encode(picture).decode()
    assert image_of(reply_with(image_base64=encoded, image_type="image/png")) == (
        picture,
        "image/png",
    )
    assert image_of(reply_with()) is None
    assert image_of(reply_with(image_base64=encoded, image_type="text/html")) is None
    assert image_of(reply_with(image_base64="not base64!", image_type="image/png")) is None


def test_a_picture_over_the_channel_limit_gets_no_link(
    settings: Settings, media_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    picture = png(64, 64)
    reply = reply_with(image_base64=base64.b64encode(picture).decode(), image_type="image/png")
    assert picture_link(media_redis, settings, reply, len(picture) - 1) is None
    assert "over the sms limit" in caplog.text
    url = picture_link(media_redis, settings, reply, len(picture))
    assert url is not None and media_redis.exists(MEDIA_PREFIX + token_of(url))


# --- end to end: an MMS to /image comes back as an MMS ---------------------------------------


def send_mms(
    base: str, twilio: TwilioRecorder, number: str, body: str, path: str = "/sms", **extra: str
) -> httpx.Response:
    """Text `body` with a 200x100 PNG attached, as Twilio posts an MMS (its media on the
    recorder, which plays Twilio's media host), or a WhatsApp message to `path`."""
    name = "ME" + uuid.uuid4().hex
    twilio.media[name] = (png(200, 100, "green"), "image/png")
    media_url = f"{twilio.url}/2010-04-01/Accounts/{twilio.account_sid}/Media/{name}"
    params, headers = twilio.webhook(
        f"{base}{path}",
        number,
        body,
        NumMedia="1",
        MediaUrl0=media_url,
        MediaContentType0="image/png",
        **extra,
    )
    return httpx.post(f"{base}{path}", data=params, headers=headers, timeout=30)


def accepted(twilio: TwilioRecorder, number: str) -> list[dict[str, Any]]:
    """The messages Twilio accepted for `number` (their forms), once there is one."""

    def sent() -> list[dict[str, Any]] | None:
        forms = [c.form for c in twilio.attempts(number) if c.status == 201]
        return forms or None

    return wait_for(sent, 60, "Twilio to accept a message")


def test_an_mms_to_the_image_helper_is_answered_with_the_picture(
    stack: str, twilio: TwilioRecorder
) -> None:
    number = "+15557270001"
    assert send_mms(stack, twilio, number, "/image thumbnail 32").status_code == 200
    (form,) = accepted(twilio, number)
    assert form["Body"].startswith("Done: 32×16 pixels")
    assert form["MediaUrl"].startswith(f"{stack}/media/")
    fetched = httpx.get(form["MediaUrl"], timeout=10)  # as Twilio fetches it: no key
    assert fetched.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(fetched.content))
    assert (picture.format, picture.size) == ("PNG", (32, 16))


def test_a_whatsapp_picture_to_the_image_helper_is_answered_with_the_picture(
    stack: str, twilio: TwilioRecorder
) -> None:
    number = "whatsapp:+15557270009"
    sent = send_mms(stack, twilio, number, "/image thumbnail 32", path="/whatsapp",
                    To=f"whatsapp:{OUR_NUMBER}")  # fmt: skip
    assert sent.status_code == 200
    (form,) = accepted(twilio, number)
    assert form["From"] == WHATSAPP_SENDER
    assert form["Body"].startswith("Done: 32×16 pixels")
    fetched = httpx.get(form["MediaUrl"], timeout=10)
    assert fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (32, 16)


def test_an_mms_twilio_refuses_is_sent_as_text_alone(stack: str, twilio: TwilioRecorder) -> None:
    number = "+15557270002"
    twilio.fail(number, (400, 21620))  # Twilio: invalid media URL
    assert send_mms(stack, twilio, number, "/image grey").status_code == 200
    (form,) = accepted(twilio, number)
    assert form["Body"].startswith("Done: 200×100 pixels, L") and "MediaUrl" not in form
    assert [("MediaUrl" in c.form, c.status) for c in twilio.attempts(number)] == [
        (True, 400),
        (False, 201),
    ]


def test_an_mms_whose_answer_was_lost_is_found_in_twilios_log_not_sent_twice(
    stack: str, twilio: TwilioRecorder, media_env: dict[str, str]
) -> None:
    number = "+15557270003"
    twilio.hang_after_accept.add(number)  # Twilio takes the MMS; the worker never hears back
    try:
        assert send_mms(stack, twilio, number, "/image thumbnail 10").status_code == 200
        log = Path(media_env["GPT4P_STATE_DIR"]) / "media-deliver@test.log"
        wait_for(lambda: "already accepted by Twilio" in log.read_text(), 60,
                 "the delivery to find the MMS in Twilio's log")  # fmt: skip
    finally:
        twilio.release.set()
    (call,) = twilio.attempts(number)
    assert call.form["MediaUrl"].startswith(f"{stack}/media/")
