"""The email channel: one fetched mail -> a job, once, with its thread as history.

The IMAP side (connecting, IDLE, remembering the last UID) is in
`channels.email_poller`; the reply is sent by `channels.email_delivery`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import cast

import redis
from celery import Celery

from channels.base import InvalidInboundError
from channels.email_parse import InboundEmail, base_subject
from channels.ratelimit import SenderRateLimit
from workers.client import submit
from workers.contract import ChatMessage, GenerationOptions, Job
from workers.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "gpt4p:email:"
SEEN_TTL_S = 90 * 24 * 3600
TURN_TTL_S = 90 * 24 * 3600
EMAIL_STYLE = " You are answering by email: reply in a few clear paragraphs, in plain text."


def digest(value: str) -> str:
    """A short stable pseudonym (addresses and Message-IDs in keys and logs)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:20]


class EmailRecords:
    """What the email channel remembers in Redis: seen Message-IDs and the thread turns."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def claim(self, message_id: str) -> bool:
        """True the first time `message_id` is seen."""
        key = f"{PREFIX}seen:{digest(message_id)}"
        return bool(self.redis.set(key, 1, nx=True, ex=SEEN_TTL_S))

    def remember_turn(self, message_id: str, message: ChatMessage) -> None:
        """Record what the mail `message_id` said, so replies to it can find their history."""
        key = f"{PREFIX}turn:{digest(message_id)}"
        self.redis.set(key, message.model_dump_json(), ex=TURN_TTL_S)

    def thread(self, references: tuple[str, ...], max_chars: int) -> list[ChatMessage]:
        """The earlier turns of a thread, oldest first, within `max_chars`."""
        if not references:
            return []
        keys = [f"{PREFIX}turn:{digest(ref)}" for ref in references]
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

    def to_job(self, inbound: object) -> Job:
        """A job for `inbound`, with the thread's earlier turns as history."""
        if not isinstance(inbound, InboundEmail):
            raise InvalidInboundError("expected a parsed email")
        prompt = self._prompt(inbound)[: self.settings.email_max_chars]
        system = ChatMessage(role="system", content=self.settings.system_prompt + EMAIL_STYLE)
        history = self.records.thread(inbound.references, self.settings.email_max_chars)
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
            },
            options=GenerationOptions(),
            idempotency_key=inbound.message_id,
        )

    def receive(self, mail: InboundEmail) -> str:
        """Queue an answer to `mail` exactly once; return what was done (for the log)."""
        if not self.records.claim(mail.message_id):
            return "duplicate"
        limit = SenderRateLimit(self.redis, f"{PREFIX}rate:", self.settings.email_rate_limit,
                                self.settings.email_rate_window)  # fmt: skip
        if limit.verdict(digest(mail.sender)) != "ok":
            return "rate limited"
        if not self._prompt(mail):
            return "empty"
        job = self.to_job(mail)
        submit(self.celery, job, client=self.redis)
        self.records.remember_turn(mail.message_id, job.messages[-1])
        return f"queued job {job.id}"
