"""The poller without IDLE: it polls, and it remembers its place per folder in Redis."""

from __future__ import annotations

import threading
from email.message import EmailMessage

import redis

from channels.email_poller import HANDLED, MailboxPoller
from tests.channels.mail_servers import Dovecot
from tests.conftest import DB_POLL, redis_url, wait_for
from workers.app import celery_for
from workers.redis_server import RedisServer
from workers.settings import Settings


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
