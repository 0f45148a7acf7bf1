"""Watching a mailbox over IMAP: IDLE when offered, polling otherwise, and never losing its place.

The last handled UID and the folder's UIDVALIDITY are kept in Redis, and
handled mail gets an IMAP keyword (and optionally moves), so a restart
neither answers old mail again nor skips new mail. A Message-ID is one job
however often it is seen. Mail that cannot be parsed is flagged and set aside,
and the poller goes on. While Redis is down, mail is simply left unflagged.
"""

from __future__ import annotations

import imaplib
import logging
import socket
import threading
from typing import cast

import redis
from celery import Celery
from imap_tools import AND, BaseMailBox, MailBox, MailBoxStartTls, MailBoxUnencrypted, MailMessage
from imap_tools.errors import MailboxLoginError, UnexpectedCommandStatusError

from channels.email.intake import EmailChannel, digest
from channels.email.parse import UnreadableMailError, read_mail, skip_reason
from kernel.redis_client import RedisUnavailableError
from kernel.replication import make_durable
from kernel.settings import Settings

log = logging.getLogger(__name__)

HANDLED = "$Gpt4pHandled"
SET_ASIDE = "$Gpt4pSetAside"
IDLE_SLICE_S = 10.0  # re-issue IDLE at least this often, so a stop is noticed quickly
OPEN_MAILBOX_WARNING = (
    "GPT4P_EMAIL_ALLOW is unset and GPT4P_EMAIL_REQUIRE_AUTH is off: this mailbox answers "
    "anyone, forged senders included; see README Security"
)
CONNECTION_ERRORS = (imaplib.IMAP4.error, OSError, socket.timeout, UnexpectedCommandStatusError)


class EmailNotConfiguredError(RuntimeError):
    """An IMAP setting needed to poll is missing; the message names it."""


class MailboxPoller:
    """Answers new mail in one folder until `stop` is set."""

    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery) -> None:
        for name in ("imap_host", "imap_user", "imap_password"):
            if getattr(settings, name) is None:
                raise EmailNotConfiguredError(f"set GPT4P_{name.upper()} to read mail")
        self.settings = settings
        self.redis = client
        self.channel = EmailChannel(settings, client, celery)
        self.stop = threading.Event()
        place = f"{settings.imap_user}@{settings.imap_host}/{settings.imap_folder}"
        self.state_key = f"gpt4p:email:mailbox:{digest(place)}"

    def connect(self) -> BaseMailBox:
        """Log in and select the watched folder."""
        s = self.settings
        port = s.imap_port or (993 if s.imap_ssl == "tls" else 143)
        kinds = {"tls": MailBox, "starttls": MailBoxStartTls, "plain": MailBoxUnencrypted}
        box = kinds[s.imap_ssl](s.imap_host, port, timeout=s.imap_timeout)
        password = s.imap_password.get_secret_value() if s.imap_password else ""
        return box.login(s.imap_user or "", password, initial_folder=s.imap_folder)

    def run(self) -> None:
        """Poll until stopped, reconnecting with backoff after any connection failure."""
        if not self.settings.email_allow and not self.settings.email_require_auth:
            # An operator going public must hear it once; no address or name is logged.
            log.warning(OPEN_MAILBOX_WARNING)
        backoff = 1.0
        while not self.stop.is_set():
            try:
                with self.connect() as box:
                    backoff = 1.0
                    self._watch(box)
            except MailboxLoginError:
                log.error("IMAP login refused for GPT4P_IMAP_USER; retrying in %.0fs", 60)
                self.stop.wait(60)
            except CONNECTION_ERRORS as error:
                log.warning("IMAP connection lost (%s); reconnecting in %.0fs",
                            error.__class__.__name__, backoff)  # fmt: skip
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)

    def _watch(self, box: BaseMailBox) -> None:
        idle = self.settings.imap_idle and "IDLE" in box.client.capabilities
        log.info("watching %s (%s)", self.settings.imap_folder, "IDLE" if idle else "polling")
        redis_backoff = 1.0
        while not self.stop.is_set():
            try:
                self.poll_once(box)
                redis_backoff = 1.0
            except (RedisUnavailableError, redis.RedisError) as error:
                # Mail stays unflagged in the mailbox: it is read again once Redis is back.
                log.warning("Redis unavailable (%s); mail waits in the mailbox, next try in "
                            "%.0fs", error.__class__.__name__, redis_backoff)  # fmt: skip
                self.stop.wait(redis_backoff)
                redis_backoff = min(redis_backoff * 2, 30.0)
                continue
            if idle:
                box.idle.wait(timeout=min(self.settings.email_poll_seconds, IDLE_SLICE_S))
            else:
                self.stop.wait(self.settings.email_poll_seconds)

    def _last_uid(self, validity: int) -> int:
        state = cast(dict[bytes, bytes], self.redis.hgetall(self.state_key))
        if int(state.get(b"uidvalidity", b"0")) != validity:
            if state:
                log.warning("UIDVALIDITY changed: rescanning (Message-IDs prevent repeats)")
            self.redis.hset(self.state_key, mapping={"uidvalidity": validity, "last_uid": 0})
            return 0
        return int(state.get(b"last_uid", b"0"))

    def poll_once(self, box: BaseMailBox) -> int:
        """Handle every new mail in the folder; return how many were handled."""
        status = box.folder.status(self.settings.imap_folder, ["UIDVALIDITY"])
        validity = int(status["UIDVALIDITY"])
        last = self._last_uid(validity)
        uids = sorted(int(u) for u in box.uids(AND(uid=f"{last + 1}:*", no_keyword=HANDLED)))
        handled = 0
        for uid in (u for u in uids if u > last):
            for mail in box.fetch(AND(uid=str(uid)), mark_seen=False):
                try:
                    self.handle(box, mail)
                except (RedisUnavailableError, redis.RedisError) as error:
                    log.error("Redis unavailable (%s); mail %d left for later", error, uid)
                    return handled
            self.redis.hset(self.state_key, "last_uid", str(uid))
            handled += 1
        return handled

    def handle(self, box: BaseMailBox, mail: MailMessage) -> None:
        """Answer, skip or set aside one mail, then flag it (and move it when configured)."""
        uid = mail.uid or ""
        try:
            inbound = read_mail(mail, self.settings)
        except UnreadableMailError as error:
            log.warning("mail %s set aside: %s", uid, error)  # no body, no sender
            box.flag(uid, [HANDLED, SET_ASIDE], True)
            self._move(box, uid, self.settings.imap_set_aside_folder)
            return
        reason = skip_reason(mail, self.settings)
        outcome = f"not answered: {reason}" if reason else self.channel.receive(inbound)
        make_durable(self.redis, self.settings)  # flagged only once a replica has the job
        log.info("mail %s from %s: %s", uid, digest(inbound.sender), outcome)
        box.flag(uid, HANDLED, True)
        self._move(box, uid, self.settings.imap_processed_folder)

    def _move(self, box: BaseMailBox, uid: str, folder: str | None) -> None:
        if not folder:
            return
        if not box.folder.exists(folder):
            box.folder.create(folder)
        box.move(uid, folder)
