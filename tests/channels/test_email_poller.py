"""The poller without IDLE: it polls, and it remembers its place per folder in Redis."""

from __future__ import annotations

import threading
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis

from channels.email.poller import HANDLED, MailboxPoller
from gpt4people.redis_server import RedisServer
from kernel.settings import Settings
from tests.channels.mail_servers import Dovecot
from tests.conftest import DB_POLL, redis_url, wait_for
from workers.app import celery_for


def test_without_idle_the_poller_polls_and_keeps_its_place(
    dovecot: Dovecot, redis_server: RedisServer
) -> None:
    settings = Settings(
        redis_url=redis_url(redis_server, DB_POLL), imap_host="127.0.0.1",
        imap_port=dovecot.port, imap_user=dovecot.user, imap_password=dovecot.password,
        imap_ssl="plain", imap_folder="Polled", imap_idle=False, email_poll_seconds=0.2,
        email_from="bot@gpt4people.test",
    )  # type: ignore[arg-type]  # fmt: skip
    with dovecot.mailbox() as box:
        if not box.folder.exists("Polled"):
            box.folder.create("Polled")
    message = EmailMessage()
    message["From"], message["Subject"] = "poll@example.org", "Polling"
    message["Message-ID"] = "<polled-1@example.org>"
    message.set_content("Are you polling?")
    client = redis.Redis.from_url(str(settings.redis_url))
    poller = MailboxPoller(settings, client, celery_for(settings))
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        with dovecot.mailbox() as box:
            box.append(message.as_bytes(), "Polled")

        def handled() -> bool:
            with dovecot.mailbox() as box:
                box.folder.set("Polled")
                return all(HANDLED in m.flags for m in box.fetch(mark_seen=False))

        wait_for(handled, 30, "the polled mail to be handled", every=0.2)
        assert client.llen("inference") == 1  # one job queued for it
        state = client.hgetall(poller.state_key)
        assert int(state[b"last_uid"]) >= 1 and int(state[b"uidvalidity"]) > 0
    finally:
        poller.stop.set()
        thread.join(30)
        client.close()
    assert not thread.is_alive()


def test_the_poller_outlives_a_redis_crash_and_reads_the_mail_that_came_meanwhile(
    dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    settings = Settings(
        redis_url=server.url, imap_host="127.0.0.1", imap_port=dovecot.port,
        imap_user=dovecot.user, imap_password=dovecot.password, imap_ssl="plain",
        imap_folder="Outage", imap_idle=False, email_poll_seconds=0.2,
        email_from="bot@gpt4people.test",
    )  # type: ignore[arg-type]  # fmt: skip
    with dovecot.mailbox() as box:
        if not box.folder.exists("Outage"):
            box.folder.create("Outage")
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    poller = MailboxPoller(settings, client, celery_for(settings))
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: client.exists(poller.state_key), 30, "the poller's first pass")
        assert server.process is not None
        server.process.kill()  # Redis crashes under the poller
        server.process.wait(10)
        wait_for(lambda: "mail waits in the mailbox" in caplog.text, 30,
                 "the poller to notice")  # fmt: skip
        message = EmailMessage()
        message["From"], message["Subject"] = "outage@example.org", "During the outage"
        message["Message-ID"] = "<outage-1@example.org>"
        message.set_content("Are you still there?")
        with dovecot.mailbox() as box:
            box.append(message.as_bytes(), "Outage")
        assert thread.is_alive()  # no traceback, no exit: it waits for Redis
        server = RedisServer(server.data_dir, port=server.port).start()
        wait_for(lambda: client.llen("inference") == 1, 60, "the mail's job, once Redis is back")
    finally:
        poller.stop.set()
        thread.join(30)
        client.close()
        server.stop()
    assert not thread.is_alive()
