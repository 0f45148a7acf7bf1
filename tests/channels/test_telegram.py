"""The Telegram channel end to end: verified webhooks and long polling in, what Telegram's
Bot API receives out.

Real Redis, a real echo inference worker, the real image helper, a real delivery
worker and the web app, all talking to a local server that speaks the Bot API
(`telegram_recorder`). The echo engine answers with the text of the message, so what
reaches the recorder shows exactly what was answered.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from channels.sms.spool import InboundSpool
from channels.telegram.delivery import Part, parts_of
from channels.telegram.intake import HELP_TEXT, RESET_TEXT, START_TEXT, command_of
from channels.telegram.state import chat_id
from channels.telegram.updates import parse_update
from channels.telegram.webhook import drain_spool, secret_matches
from channels.web import create_app
from gpt4people.redis_server import RedisServer, free_port
from kernel.contract import MediaRef, Reply
from kernel.helper_registry import HelperRegistry
from kernel.settings import Settings
from kernel.telegram_api import BotApi, BotApiUnreachableError
from tests.channels.telegram_recorder import TelegramRecorder, running_recorder, update
from tests.conftest import (
    ROOT,
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
from tests.helpers.conftest import start_helper
from workers.app import celery_for

DB_TELEGRAM = 25  # this module's stack, on the session's Redis
SECRET = "test-webhook-secret_42"
RATE_LIMIT = 5
MEDIA_MAX_BYTES = 300_000
_chats = itertools.count(8_765_430_001)


@pytest.fixture
def chat() -> int:
    """A private chat no other test writes from (ids distinctive enough to find in a log)."""
    return next(_chats)


@pytest.fixture(scope="module")
def bot() -> Iterator[TelegramRecorder]:
    """The local Bot API server; GPT4P_TELEGRAM_API_BASE points at it."""
    with running_recorder() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def tg_env(redis_server: RedisServer, state_dir: Path, bot: TelegramRecorder) -> dict[str, str]:
    """Settings of the Telegram stack: echo engine, the Bot API at the recorder."""
    return base_env(
        state_dir, redis_url=redis_url(redis_server, DB_TELEGRAM), engine="echo",
        **bot.settings(), telegram_secret=SECRET, telegram_retry_backoff="0.1",
        telegram_rate_limit=str(RATE_LIMIT), telegram_max_inbound_chars="10000",
        telegram_max_tokens="4096", max_prompt_chars="100000", telegram_timeout="2",
        telegram_poll_timeout="1", telegram_media_max_bytes=str(MEDIA_MAX_BYTES),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tg_redis(tg_env: dict[str, str]) -> Iterator[redis.Redis]:
    with emptied_database(tg_env["GPT4P_REDIS_URL"]) as client:
        yield client


@pytest.fixture(scope="module")
def tg_web(tg_env: dict[str, str], tg_redis: redis.Redis) -> Iterator[str]:
    """The web app, an echo inference worker, the image helper and a delivery worker."""
    helper = start_helper(tg_env, "tg-image", "image")
    processes = [
        helper,
        start_worker(tg_env, "tg-echo@test"),
        start_worker(tg_env, "tg-deliver@test", command="deliver"),
    ]
    registry = HelperRegistry(tg_redis, ttl=15)
    try:
        wait_for(lambda: "image" in {h.name for h in registry.live()}, 90, "the image helper")
        port = free_port()
        processes.append(start_web(tg_env, port))
        yield f"http://127.0.0.1:{port}"
    finally:
        for process in reversed(processes):
            stop_process(process)


def post(base: str, body: dict[str, Any], secret: str | None = SECRET) -> httpx.Response:
    """Post `body` to the webhook as Telegram does (with the secret-token header)."""
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}
    return httpx.post(f"{base}/telegram", json=body, headers=headers, timeout=30)


def replies(bot: TelegramRecorder, chat: int, count: int) -> list[str]:
    """Wait until Telegram accepted `count` messages for `chat`; return their texts."""

    def enough() -> list[str] | None:
        delivered = bot.delivered(chat)
        return delivered if len(delivered) >= count else None

    return wait_for(enough, 30, f"{count} message(s) to reach Telegram")


def wait_idle(client: redis.Redis) -> None:
    """Wait until no job or delivery is queued, held or waiting to be retried."""

    def idle() -> bool:
        queued = queued_jobs(client) + client.llen("deliver.telegram")
        return queued == 0 and client.hlen("unacked") == 0

    wait_for(idle, 30, "the queues to drain")


# --- the webhook ------------------------------------------------------------------------


def test_a_message_is_answered_once_by_send_message(
    tg_web: str, bot: TelegramRecorder, chat: int
) -> None:
    response = post(tg_web, update(chat, "What is the capital of France?"))
    assert response.status_code == 200
    assert "method" not in response.text  # never a reply in the webhook's answer
    assert replies(bot, chat, 1) == ["What is the capital of France?"]
    assert [c.method for c in bot.attempts(chat)] == ["sendMessage"]


@pytest.mark.parametrize("secret", [None, "not-the-secret", SECRET + "x", ""])
def test_a_wrong_or_missing_secret_is_refused_and_nothing_is_queued(
    tg_web: str, bot: TelegramRecorder, chat: int, tg_redis: redis.Redis, secret: str | None
) -> None:
    forged = update(chat, "forged")
    assert post(tg_web, forged, secret=secret).status_code == 403
    assert queued_jobs(tg_redis) == 0
    # Nothing was recorded of it: the same update, genuine, is answered.
    assert post(tg_web, forged).status_code == 200
    assert replies(bot, chat, 1) == ["forged"]
    wait_idle(tg_redis)
    assert len(bot.attempts(chat)) == 1


def test_the_same_update_twice_is_answered_once(
    tg_web: str, bot: TelegramRecorder, chat: int, tg_redis: redis.Redis
) -> None:
    body = update(chat, "Only once please")
    for _ in range(3):
        assert post(tg_web, body).status_code == 200
    replies(bot, chat, 1)
    wait_idle(tg_redis)
    assert bot.delivered(chat) == ["Only once please"]


def test_start_and_help_are_answered_without_the_model(
    tg_web: str, bot: TelegramRecorder, chat: int
) -> None:
    post(tg_web, update(chat, "/start"))
    assert replies(bot, chat, 1) == [START_TEXT]
    post(tg_web, update(chat, "/help@GPT4PeopleBot"))  # as Telegram writes it in groups
    assert replies(bot, chat, 2)[1] == HELP_TEXT


def test_reset_clears_the_chat_conversation(
    tg_web: str, bot: TelegramRecorder, chat: int, tg_redis: redis.Redis
) -> None:
    history = f"gpt4p:telegram:history:{chat_id(chat)}"
    post(tg_web, update(chat, "Remember me"))
    replies(bot, chat, 1)
    wait_for(lambda: tg_redis.llen(history) == 2, 10, "the exchange to be remembered")
    post(tg_web, update(chat, "/reset"))
    assert replies(bot, chat, 2)[1] == RESET_TEXT
    assert tg_redis.exists(history) == 0
    assert not any(str(chat).encode() in key for key in tg_redis.keys("gpt4p:telegram:*"))


def test_a_long_answer_is_split_at_4096_and_a_429_sends_each_part_once(
    tg_web: str, bot: TelegramRecorder, chat: int, tg_redis: redis.Redis
) -> None:
    sentence = "Every part is sent exactly one time, even when Telegram says wait. "
    body = (sentence * 100).strip()  # 6,799 characters: two parts
    # Part 1 goes through; part 2 is refused once with 429 retry_after=1, then taken.
    bot.fail(chat, (200, None), (429, 1))
    post(tg_web, update(chat, body))
    parts = replies(bot, chat, 2)
    wait_idle(tg_redis)
    assert [c.status for c in bot.attempts(chat)] == [200, 429, 200]
    assert [p[:6] for p in parts] == ["(1/2) ", "(2/2) "]
    assert all(len(p) <= 4096 for p in parts)
    assert " ".join(p[6:] for p in parts) == body


def test_a_blocked_bot_is_not_retried(
    tg_web: str, bot: TelegramRecorder, chat: int, tg_redis: redis.Redis
) -> None:
    bot.fail(chat, (403, None))
    post(tg_web, update(chat, "Hello?"))
    wait_for(lambda: bot.attempts(chat), 30, "the send attempt")
    wait_idle(tg_redis)
    assert len(bot.attempts(chat)) == 1
    # Writing again unblocks: they are answered.
    post(tg_web, update(chat, "I'm back"))
    assert replies(bot, chat, 1) == ["I'm back"]


def test_a_send_without_an_answer_is_never_sent_again(
    tg_web: str, bot: TelegramRecorder, chat: int, tg_redis: redis.Redis
) -> None:
    # Telegram takes the message and its answer never comes (GPT4P_TELEGRAM_TIMEOUT=2):
    # it may be in the chat, and Telegram keeps no log to ask, so it is not sent again.
    bot.hang.add(chat)
    post(tg_web, update(chat, "Maybe delivered"))
    wait_for(lambda: bot.attempts(chat), 30, "the send attempt")
    wait_idle(tg_redis)
    assert len(bot.attempts(chat)) == 1


def test_a_photo_with_image_comes_back_as_a_photo(
    tg_web: str, bot: TelegramRecorder, chat: int
) -> None:
    picture = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(picture, "JPEG")
    bot.add_file(f"small{chat}", b"not fetched")
    bot.add_file(f"large{chat}", picture.getvalue())
    sizes = [
        {"file_id": f"small{chat}", "file_unique_id": "s", "width": 8, "height": 6,
         "file_size": 11},
        {"file_id": f"large{chat}", "file_unique_id": "l", "width": 64, "height": 48,
         "file_size": len(picture.getvalue())},
        {"file_id": f"huge{chat}", "file_unique_id": "h", "width": 6400, "height": 4800,
         "file_size": MEDIA_MAX_BYTES + 1},  # over GPT4P_TELEGRAM_MEDIA_MAX_BYTES: never asked
    ]  # fmt: skip
    post(tg_web, update(chat, caption="/image grayscale", photo=sizes))
    photos = wait_for(lambda: bot.photos(chat), 60, "the picture to reach Telegram")
    assert photos[0].method == "sendPhoto"
    assert photos[0].photo is not None and photos[0].photo.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(photos[0].photo)).mode == "L"
    assert photos[0].text.startswith("Done: 64×48 pixels")  # the helper's words, as caption
    assert [f for f in bot.file_requests if f.endswith(str(chat))] == [f"large{chat}"]


JUNK: list[tuple[bytes, str]] = [
    (b"{not json", "invalid update fields: body"),
    (b'{"update_id": "x"}', "update_id"),
    (b'{"update_id": 1, "message": {"message_id": 1, "chat": {}}}', "message.chat.id"),
]


@pytest.mark.parametrize(("body", "named"), JUNK)
def test_junk_is_a_400_naming_the_field(tg_web: str, body: bytes, named: str) -> None:
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
    response = httpx.post(f"{tg_web}/telegram", content=body, headers=headers)
    assert response.status_code == 400
    assert named in response.text


def test_an_oversized_body_is_refused_before_parsing(tg_web: str) -> None:
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
    response = httpx.post(f"{tg_web}/telegram", content=b"[" * 300_000, headers=headers)
    assert response.status_code == 413


def test_updates_of_other_kinds_are_acknowledged_and_ignored(
    tg_web: str, tg_redis: redis.Redis, chat: int, bot: TelegramRecorder
) -> None:
    edited = {"update_id": 5, "edited_message": {"message_id": 1, "chat": {"id": chat}}}
    assert post(tg_web, edited).status_code == 200
    wait_idle(tg_redis)
    assert bot.attempts(chat) == []


def test_without_a_secret_the_webhook_is_unavailable(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, telegram_bot_token="1:" + "a" * 30)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as web:
        response = web.post("/telegram", json=update(1, "hi"))
    assert response.status_code == 503


def test_an_update_arriving_while_redis_is_silent_is_spooled_then_answered_once(
    tmp_path: Path, tg_web: str, tg_env: dict[str, str], bot: TelegramRecorder, chat: int,
    tg_redis: redis.Redis,
) -> None:  # fmt: skip
    silent = socket.socket()  # a Redis host that accepts and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    silent_url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    down = settings_of(tg_env).model_copy(update={"redis_url": silent_url, "state_dir": tmp_path})
    try:
        with TestClient(create_app(down)) as web:
            started = time.monotonic()
            response = web.post("/telegram", json=update(chat, "anyone there?"),
                                headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})  # fmt: skip
            assert response.status_code == 200
            assert time.monotonic() - started < 5
    finally:
        silent.close()
    # Redis is back (the stack's): the spool is handed over, and the update answered once.
    spool = InboundSpool(tmp_path / "spool.sqlite3")
    settings = settings_of(tg_env)
    try:
        assert len(spool) == 1
        assert drain_spool(spool, settings, tg_redis, celery_for(settings)) == 1
        assert drain_spool(spool, settings, tg_redis, celery_for(settings)) == 0
    finally:
        spool.close()
    assert replies(bot, chat, 1) == ["anyone there?"]
    wait_idle(tg_redis)
    assert len(bot.attempts(chat)) == 1


# --- long polling -------------------------------------------------------------------------


def start_poller(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start `gpt4people telegram` (it logs to the state folder)."""
    log = open(Path(env["GPT4P_STATE_DIR"]) / "telegram-poller.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "telegram", *args], env=env, cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def test_polling_waits_without_polling_while_a_webhook_is_set(
    tg_env: dict[str, str], bot: TelegramRecorder
) -> None:
    # It says what to fix and stays up: exiting would make `up` stop the whole stack.
    bot.webhook_url = "https://bot.example.com/telegram"
    log = Path(tg_env["GPT4P_STATE_DIR"]) / "telegram-poller.log"
    polls = len(bot.offsets)
    poller = start_poller(tg_env)
    try:
        wait_for(lambda: log.exists() and "a webhook is set" in log.read_text(), 60,
                 "the poller to say a webhook is set")  # fmt: skip
        assert poller.poll() is None  # still running
        assert len(bot.offsets) == polls  # and never asked for updates
        assert bot.token not in log.read_text()
    finally:
        stop_process(poller)
        bot.webhook_url = ""


def test_polling_answers_and_keeps_its_place_across_a_restart(
    tg_web: str, tg_env: dict[str, str], bot: TelegramRecorder, tg_redis: redis.Redis
) -> None:
    first_chat, second_chat = next(_chats), next(_chats)
    bot.webhook_url = "https://bot.example.com/telegram"  # --delete-webhook removes it
    first = update(first_chat, "Polled question")
    bot.push(first)
    poller = start_poller(tg_env, "--delete-webhook")
    try:
        assert replies(bot, first_chat, 1) == ["Polled question"]
        assert bot.webhook_url == ""
        wait_for(lambda: first["update_id"] + 1 in bot.offsets, 10, "the update to be confirmed")
    finally:
        started = time.monotonic()
        stop_process(poller)
    assert time.monotonic() - started < 5, "the poller did not stop promptly"
    polled = len(bot.offsets)
    second = update(second_chat, "Asked while it was down")
    bot.push(second)
    poller = start_poller(tg_env)
    try:
        assert replies(bot, second_chat, 1) == ["Asked while it was down"]
    finally:
        stop_process(poller)
    # The restarted poller began where the first left off: nothing repeated, nothing skipped.
    assert bot.offsets[polled] == first["update_id"] + 1
    wait_idle(tg_redis)
    assert bot.delivered(first_chat) == ["Polled question"]
    # Its place is forgotten before Telegram numbers updates anew (after a week of silence).
    [place] = tg_redis.keys("gpt4p:telegram:offset:*")
    assert 0 < tg_redis.ttl(place) <= 6 * 86_400


# --- privacy ------------------------------------------------------------------------------


def test_chat_ids_texts_and_the_token_stay_out_of_the_logs(
    tg_web: str, bot: TelegramRecorder, chat: int, state_dir: Path, tg_redis: redis.Redis
) -> None:
    secret = "my secret diagnosis is flu"
    post(tg_web, update(chat, secret))
    replies(bot, chat, 1)
    wait_idle(tg_redis)
    port = tg_web.rsplit(":", 1)[1]
    logs = [state_dir / f"{name}.log" for name in ("tg-deliver@test", "tg-echo@test",
                                                   f"web-{port}", "helper-tg-image")]  # fmt: skip
    logs += (
        [state_dir / "telegram-poller.log"] if (state_dir / "telegram-poller.log").exists() else []
    )
    used_chats = range(8_765_430_001, next(_chats))
    for log in logs:
        content = log.read_text()
        assert secret not in content, log.name
        assert bot.token not in content and SECRET not in content, log.name
        assert not [c for c in used_chats if str(c) in content], log.name
    assert chat_id(chat) in (state_dir / "tg-deliver@test.log").read_text()


# --- pure functions -----------------------------------------------------------------------


def test_a_photo_rides_on_the_job_as_its_largest_size_within_the_bound() -> None:
    sizes = [{"file_id": "a", "width": 90, "height": 60, "file_size": 900},
             {"file_id": "b", "width": 800, "height": 600, "file_size": 90_000},
             {"file_id": "c", "width": 1280, "height": 960, "file_size": 400_000}]  # fmt: skip
    message = parse_update(json.dumps(update(1, caption="hi", photo=sizes))).message
    assert message is not None and message.words == "hi"
    assert message.media(100_000) == [MediaRef(url="telegram-file:b", content_type="image/jpeg")]
    assert message.media(500) == []


@pytest.mark.parametrize(
    ("words", "command"),
    [("/start", ("start", "/start")), ("/HELP@SomeBot", ("help", "/HELP")),
     ("/calc@SomeBot 2+3", ("calc", "/calc 2+3")), ("hello /start", None), ("/", None)],
)  # fmt: skip
def test_commands_are_read_without_the_bot_name(
    words: str, command: tuple[str, str] | None
) -> None:
    assert command_of(words) == command


def test_a_picture_goes_first_with_the_text_as_caption_when_it_fits() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(32)
    context = {"image_base64": base64.b64encode(png).decode(), "image_type": "image/png"}

    def reply(text: str) -> Reply:
        return Reply(job_id="j", channel="telegram", reply_to="1", text=text, model="m",
                     engine="helper", context=context)  # fmt: skip

    assert parts_of(reply("**Done**"), 3) == [Part("Done", (png, "image/png"))]
    long = parts_of(reply("word " * 400), 3)
    assert long[0] == Part("", (png, "image/png")) and long[1].picture is None


def test_the_secret_is_compared_exactly() -> None:
    assert secret_matches("abc", "abc")
    assert not secret_matches("abd", "abc") and not secret_matches(None, "abc")
    assert not secret_matches("", "abc")


def test_an_unreachable_api_never_names_the_token() -> None:
    token = "123:" + "s" * 30
    api = BotApi(token, f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(BotApiUnreachableError) as raised:
        api.call("sendMessage", {"chat_id": 1, "text": "x"})
    assert token not in str(raised.value) and not raised.value.maybe_sent


def test_only_a_telegram_job_may_open_the_bots_files() -> None:
    # The bot's token fetches them: an HTTP caller naming a file id gets nothing of it.
    from channels.http.openai_schema import ImageUrl
    from helpers.image import load
    from kernel.contract import MediaRef
    from kernel.helper_contract import HelperError

    ref = MediaRef(url="telegram-file:AgACAgIAAxkBAAIBSomeoneElsesPhoto", content_type="image/*")
    for channel in ("http", "sms", "email", ""):
        with pytest.raises(HelperError):
            load(ref, channel)
    with pytest.raises(ValueError, match="data: URL or an http"):
        ImageUrl(url="telegram-file:AgACAgIAAxkBAAIBSomeoneElsesPhoto")
    with pytest.raises(ValueError):
        ImageUrl(url="file:///etc/passwd")


def test_the_bot_is_configured_by_its_token_and_up_polls_only_without_a_webhook() -> None:
    from kernel.channels import CHANNELS

    telegram = CHANNELS["telegram"]
    hooked = Settings(telegram_bot_token="123456:" + "a" * 35, telegram_secret="s3cret_token",
                      public_url="https://bot.example.com")  # fmt: skip
    polling = Settings(telegram_bot_token="123456:" + "a" * 35)
    assert telegram.configured(hooked) and not telegram.starts_command(hooked)
    assert telegram.configured(polling) and telegram.starts_command(polling)
    assert not telegram.configured(Settings())
