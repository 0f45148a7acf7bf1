"""Sending replies to Telegram chats with the Bot API, each message exactly once.

The task on queue ``deliver.telegram`` writes the model's markdown as plain text
(MarkdownV2 would need 18 characters escaped exactly, and one miss makes Telegram
refuse the whole message with a 400; a chat shows plain text well), split into
numbered parts of Telegram's 4096 characters (`split_for_sms` with that limit). A
helper's picture goes first with ``sendPhoto``, uploaded as multipart (no public URL
needed), with the text as its caption when it fits 1024 characters.

Each part is claimed in Redis before its send and recorded after it, so a retried
task sends only what is missing. Telegram keeps no log of sent messages to ask, so
a send that got no answer (a read timeout, a connection lost after the request went
out) is settled the safe way for a chat: recorded as *unconfirmed* and never sent
again (counted in ``gpt4p_delivery_failures_total{reason="unconfirmed"}``); the
task retries after its backoff for the parts after it. A duplicate in a chat is as
plain as a gap, and retrying would turn every slow answer into a duplicate; failures
before the request left (no connection) are retried in full. A claim left by a
delivery worker that died mid-send is settled the same way once older than
GPT4P_TELEGRAM_TIMEOUT + 5 s.

429 (Telegram's ``retry_after`` honoured) and 5xx are retried with backoff; other
refusals are permanent, and 403 (the person blocked the bot, or it left their group)
stops replies to that chat until they write again. Retries, the hourly cap
(GPT4P_TELEGRAM_MAX_PER_HOUR), logs and metrics are every channel's (`channels.delivery`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Retry

from channels.delivery import (
    DELIVERED,
    Delivery,
    DeliveryPolicy,
    Outcome,
    PermanentDeliveryError,
    TransientDeliveryError,
    freed_if_unsent,
    send_each_once,
)
from channels.media_links import image_of
from channels.outbound_cap import OutboundCap
from channels.plaintext import plain_text
from channels.sms.split import split_for_sms, utf16_len
from channels.telegram.state import TelegramState, chat_id, chat_key
from kernel.contract import ChatMessage, Reply, delivery_task
from kernel.metrics import Metrics
from kernel.replication import make_durable
from kernel.settings import get_settings
from kernel.telegram_api import BotApi, BotApiError, BotApiUnreachableError
from workers.app import app

log = logging.getLogger(__name__)

TELEGRAM_MAX_CHARS = 4096  # one message's text
CAPTION_MAX_CHARS = 1024  # a photo's caption
SEND_PHOTO_MAX_BYTES = 10_000_000  # sendPhoto's upload limit
UNCONFIRMED = "unconfirmed"  # a part's record when Telegram's answer never came
BLOCKED_STATUS = 403  # the bot was blocked by the person, or removed from the group
CHAT_ID = re.compile(r"^-?[0-9]{1,16}$")


class RetryAfterError(TransientDeliveryError):
    """Telegram is busy (429, 5xx): try again, not before `retry_after` seconds if it said."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnconfirmedSendError(TransientDeliveryError):
    """The send got no answer: the part may have reached the chat, and is not sent again."""


@dataclass(frozen=True)
class Part:
    """One message of a reply: text, or a picture (bytes, type) with the text as caption."""

    text: str
    picture: tuple[bytes, str] | None = None


def parts_of(reply: Reply, max_parts: int) -> list[Part]:
    """The messages that carry `reply`: its picture first when it has one, then its text in
    numbered parts of at most 4096 characters (the caption, when it is short)."""
    texts = split_for_sms(plain_text(reply.text), max_parts=max_parts, limit=TELEGRAM_MAX_CHARS)
    picture = image_of(reply)
    if picture is not None and len(picture[0]) > SEND_PHOTO_MAX_BYTES:
        log.warning("reply %s: its picture (%d bytes) is over sendPhoto's limit; text alone",
                    reply.job_id, len(picture[0]))  # fmt: skip
        picture = None
    if picture is None:
        return [Part(text) for text in texts]
    if len(texts) == 1 and utf16_len(texts[0]) <= CAPTION_MAX_CHARS:
        return [Part(texts[0], picture)]
    return [Part("", picture), *(Part(text) for text in texts)]


def post(api: BotApi, chat: int, part: Part) -> Any:
    """Send one part (`sendPhoto` uploading the picture, or `sendMessage`); Telegram's
    message. Raises `BotApiError` or `BotApiUnreachableError`."""
    if part.picture is None:
        return api.call("sendMessage", {"chat_id": chat, "text": part.text,
                                        "link_preview_options": {"is_disabled": True}})  # fmt: skip
    data, kind = part.picture
    name = "picture." + kind.split("/", 1)[1].split(";")[0]
    fields: dict[str, Any] = {"chat_id": chat, **({"caption": part.text} if part.text else {})}
    return api.call("sendPhoto", fields, files={"photo": (name, data, kind)})


@lru_cache(maxsize=1)
def _api() -> BotApi:
    """This process's Bot API client (one connection pool for every delivery)."""
    try:
        return BotApi.from_settings(get_settings())
    except ValueError as error:
        raise PermanentDeliveryError(str(error)) from None


class TelegramSender:
    """Sends a reply's parts to a chat, each exactly once (claimed, sent, recorded)."""

    def __init__(self, api: BotApi, state: TelegramState, reply: Reply) -> None:
        self.api = api
        self.state = state
        self.reply = reply
        self.stale_after = state.settings.telegram_timeout + 5

    def send_all(self, parts: list[Part], cap: OutboundCap | None) -> int:
        """Send every part not sent yet; return how many were sent now. The parts still to
        send are taken from `cap` together, before the first goes out."""
        return send_each_once(len(parts), claim=self._claim,
                              send=lambda index: self._send(index, parts[index]),
                              release=self._release, cap=cap,
                              maybe_sent=UnconfirmedSendError)  # fmt: skip

    def _key(self) -> str:
        return self.reply.job_id

    def _release(self, index: int) -> None:
        self.state.release_part(self._key(), index)

    def _claim(self, index: int) -> bool:
        """Claim part `index` for sending now; False when it was sent (or may have been)."""
        claim, _ = self.state.claim_part(self._key(), index, self.stale_after)
        if claim == "in_flight":
            raise TransientDeliveryError(f"part {index} is being sent by another delivery")
        if claim == "unknown":  # its delivery died mid-send: Telegram may have it
            self._unconfirmed(index)
            return False
        return claim == "claimed"

    def _unconfirmed(self, index: int) -> None:
        log.warning("part %d of %s may have reached Telegram (no answer): not sent again",
                    index, self.reply.job_id)  # fmt: skip
        self.state.record_part(self._key(), index, UNCONFIRMED)
        labels = {"channel": "telegram", "reason": "unconfirmed"}
        Metrics(self.state.redis).count("gpt4p_delivery_failures", labels)

    def _send(self, index: int, part: Part) -> None:
        """Send claimed part `index` and record it; a send that surely failed frees it."""
        state = self.state
        # The claim must survive a failover before the send, which cannot be undone.
        with freed_if_unsent(lambda: self._release(index)):
            make_durable(state.redis, state.settings)
        try:
            message = self._post(part)
        except BotApiUnreachableError as error:
            if error.maybe_sent:
                self._unconfirmed(index)
                raise UnconfirmedSendError(str(error)) from None
            self._release(index)
            raise TransientDeliveryError(str(error)) from None
        except BotApiError as error:
            self._release(index)
            if error.status == 429 or error.status >= 500:
                raise RetryAfterError(str(error), error.retry_after) from None
            raise PermanentDeliveryError(str(error), error.status) from None
        message_id = message.get("message_id") if isinstance(message, dict) else None
        state.record_part(self._key(), index, f"message:{message_id}")

    def _post(self, part: Part) -> Any:
        """`post`; a picture Telegram refuses (its size, its shape) leaves the text alone."""
        chat = int(self.reply.reply_to)
        try:
            return post(self.api, chat, part)
        except BotApiError as error:
            if part.picture is None or error.status != 400:
                raise
            log.warning("reply %s: Telegram refused its picture (%s); text alone",
                        self.reply.job_id, error.description)  # fmt: skip
            if not part.text:
                return {}
            return post(self.api, chat, Part(part.text))


class TelegramDelivery(Delivery):
    """A reply's delivery to a Telegram chat that has not blocked the bot, in parts."""

    channel = "telegram"
    nothing_sent: ClassVar[dict[str, Any]] = {"sent": 0}
    retry_after: float | None = None

    @property
    def policy(self) -> DeliveryPolicy:
        """GPT4P_TELEGRAM_MAX_RETRIES, GPT4P_TELEGRAM_RETRY_BACKOFF and the hourly cap."""
        return DeliveryPolicy(
            max_retries=self.settings.telegram_max_retries,
            backoff_s=self.settings.telegram_retry_backoff,
            backoff_ceiling_s=300.0,
            per_hour=self.settings.telegram_max_per_hour,
        )

    @cached_property
    def recipient(self) -> str:
        """The chat's pseudonym (`chat_id`)."""
        return chat_id(self.reply.reply_to)

    @cached_property
    def state(self) -> TelegramState:
        """What the Telegram channel keeps in Redis: part claims, blocks, conversations."""
        return TelegramState(self.redis, self.settings)

    def send(self) -> Outcome:
        """Send the parts not sent yet; the reply joins the chat's conversation."""
        reply, who = self.reply, chat_key(self.reply.reply_to)
        if not CHAT_ID.match(reply.reply_to):
            raise PermanentDeliveryError("the reply is not addressed to a Telegram chat id")
        if self.state.is_opted_out(who):
            log.info("reply %s not sent: %s blocked the bot", reply.job_id, self.recipient)
            return Outcome("blocked", {"sent": 0})
        parts = parts_of(reply, self.settings.telegram_max_parts)
        try:
            sent = TelegramSender(_api(), self.state, reply).send_all(parts, self.cap())
        except RetryAfterError as error:
            self.retry_after = error.retry_after
            raise
        if reply.engine != "keyword":
            self.state.remember(who, ChatMessage(role="assistant", content=reply.text))
        return Outcome(DELIVERED, {"sent": sent}, how=f" in {sent} part(s)")

    def refused(self, error: PermanentDeliveryError) -> dict[str, Any]:
        """A chat that blocked the bot (403) gets nothing more until it writes again."""
        if error.code == BLOCKED_STATUS:
            self.state.opt_out(chat_key(self.reply.reply_to))
        return {"sent": 0, "code": error.code}

    def retry_later(self) -> Retry:
        """The task's retry after the channel's backoff, or Telegram's retry_after if longer."""
        delay = self.policy.retry_in(self.task.request.retries)
        # At most the backoff ceiling whatever Telegram says: a day-long countdown would
        # outlive the broker's visibility timeout and the reply would come a day late.
        wait = min(max(delay, self.retry_after or 0.0), self.policy.backoff_ceiling_s)
        return self.task.retry(countdown=wait)


@app.task(name=delivery_task("telegram"), bind=True, max_retries=None)
def deliver_telegram(self: Task, reply_data: dict[str, Any]) -> dict[str, Any]:
    """Send a reply to a Telegram chat: each part once, transient failures retried."""
    return TelegramDelivery(self, Reply.model_validate(reply_data)).run()
