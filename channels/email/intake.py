"""The email channel: one fetched mail -> a job, once, with its thread as history.

The IMAP side (connecting, IDLE, remembering the last UID) is in
`channels.email.poller`; the reply is sent by `channels.email.delivery`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from typing import cast

import redis
from celery import Celery

from channels.base import InvalidInboundError
from channels.email.parse import InboundEmail, allowed, base_subject
from kernel.contract import ChatMessage, GenerationOptions, Job
from kernel.ratelimit import SenderRateLimit
from kernel.settings import Settings
from workers.client import submit

log = logging.getLogger(__name__)

PREFIX = "gpt4p:email:"
SEEN_TTL_S = 90 * 24 * 3600
TURN_TTL_S = 90 * 24 * 3600
MAX_REFERENCES = 50  # the newest ids of a References header that are looked up
EMAIL_STYLE = " You are answering by email: reply in a few clear paragraphs, in plain text."


def digest(value: str) -> str:
    """A short stable pseudonym (addresses and Message-IDs in keys and logs)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:20]


def owner_key(address: str) -> str:
    """Whose thread turns are whose: the pseudonym of an address, as stored with each turn."""
    return digest(address.lower())


class EmailRecords:
    """What the email channel remembers in Redis: seen Message-IDs and the thread turns.

    A turn belongs to the people who saw it (the asker, and the address answered),
    and is stored under each of their pseudonyms: a Message-ID alone, which anyone
    can copy into a References header, never brings one person's thread to another.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def claim(self, message_id: str) -> bool:
        """True the first time `message_id` is seen."""
        key = f"{PREFIX}seen:{digest(message_id)}"
        return bool(self.redis.set(key, 1, nx=True, ex=SEEN_TTL_S))

    @staticmethod
    def _turn_key(owner: str, message_id: str) -> str:
        return f"{PREFIX}turn:{owner}:{digest(message_id)}"

    def remember_turn(self, owners: Iterable[str], message_id: str, message: ChatMessage) -> None:
        """Record what the mail `message_id` said, for the later mail of these `owners`
        (`owner_key`s) that refers to it."""
        value = message.model_dump_json()
        pipe = self.redis.pipeline()
        for owner in dict.fromkeys(owners):
            pipe.set(self._turn_key(owner, message_id), value, ex=TURN_TTL_S)
        pipe.execute()

    def thread(self, owner: str, references: tuple[str, ...], max_chars: int) -> list[ChatMessage]:
        """The earlier turns of `owner`'s thread, oldest first, within `max_chars`."""
        if not references:
            return []
        keys = [self._turn_key(owner, ref) for ref in references[-MAX_REFERENCES:]]
        raw = cast(list[bytes | None], self.redis.mget(keys))
        turns = [ChatMessage.model_validate(json.loads(r)) for r in raw if r]
        while turns and sum(len(t.content) for t in turns) > max_chars:
            turns = turns[1:]
        while turns and turns[0].role != "user":
            turns = turns[1:]
        return turns


class EmailChannel:
    """Turns a readable, answerable mail into a job on the inference queue."""

    name = "email"

    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery) -> None:
        self.settings = settings
        self.records = EmailRecords(client)
        self.redis = client
        self.celery = celery

    def _prompt(self, mail: InboundEmail) -> str:
        subject = base_subject(mail.subject)
        if mail.references or not subject or subject.lower() in mail.question.lower():
            return mail.question or subject
        return f"{subject}\n\n{mail.question}".strip()

    @staticmethod
    def _owners(mail: InboundEmail) -> list[str]:
        return list(dict.fromkeys(owner_key(a) for a in (mail.sender, mail.reply_address)))

    def to_job(self, inbound: object) -> Job:
        """A job for `inbound`, with its sender's earlier turns of the thread as history."""
        if not isinstance(inbound, InboundEmail):
            raise InvalidInboundError("expected a parsed email")
        prompt = self._prompt(inbound)[: self.settings.email_max_chars]
        system = ChatMessage(role="system", content=self.settings.system_prompt + EMAIL_STYLE)
        history = self.records.thread(
            owner_key(inbound.sender), inbound.references, self.settings.email_max_chars
        )
        return Job(
            id=f"email-{digest(inbound.message_id)}",
            channel=self.name,
            user=inbound.sender,
            messages=[system, *history, ChatMessage(role="user", content=prompt)],
            reply_to=inbound.reply_address,
            reply_from=self.settings.email_from,
            media=list(inbound.attachments),
            context={
                "subject": inbound.subject,
                "message_id": inbound.message_id,
                "references": " ".join(inbound.references),
                "question": inbound.question[:2000],
                "sender_name": inbound.sender_name,
                "date": inbound.date,
                "thread_owners": " ".join(self._owners(inbound)),
                # Whether the reply may quote the mail: see channels.email.delivery._quote.
                "authenticated": "true" if inbound.authenticated else "false",
            },
            options=GenerationOptions(),
            idempotency_key=inbound.message_id,
        )

    def refusal(self, mail: InboundEmail) -> str | None:
        """Why `mail` must not be answered at the address chosen for it, or None."""
        if self.settings.email_require_auth and not mail.authenticated:
            return "sender not authenticated (GPT4P_EMAIL_REQUIRE_AUTH)"
        if not (allowed(mail.sender, self.settings) and allowed(mail.reply_address, self.settings)):
            return "address not on the allow-list"
        return None

    def _rate_limited(self, mail: InboundEmail) -> bool:
        """Counts the mail against the sender and the address we send to (when another)."""
        limit = SenderRateLimit(self.redis, f"{PREFIX}rate:", self.settings.email_rate_limit,
                                self.settings.email_rate_window)  # fmt: skip
        addresses = dict.fromkeys((mail.sender, mail.reply_address))
        return any(limit.verdict(digest(a)) != "ok" for a in addresses)

    def receive(self, mail: InboundEmail) -> str:
        """Queue an answer to `mail` exactly once; return what was done (for the log)."""
        refused = self.refusal(mail)
        if refused:
            return f"not answered: {refused}"
        if not self.records.claim(mail.message_id):
            return "duplicate"
        if self._rate_limited(mail):
            return "rate limited"
        if not self._prompt(mail):
            return "empty"
        job = self.to_job(mail)
        submit(self.celery, job, client=self.redis)
        self.records.remember_turn(self._owners(mail), mail.message_id, job.messages[-1])
        note = " (Reply-To not honoured)" if mail.reply_to_ignored else ""
        return f"queued job {job.id}{note}"
