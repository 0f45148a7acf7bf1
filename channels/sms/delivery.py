"""Sending SMS replies through Twilio's REST API, each part exactly once.

The task on queue ``deliver.sms`` splits the reply, and for every part claims
it in Redis before the send and records Twilio's message SID after it. A
retried task (Twilio 429/5xx) skips the parts already sent. A part whose send
got no answer (a timeout), or whose delivery worker died between Twilio
accepting it and the SID being recorded, stays claimed; once the claim is
older than the Twilio timeout + 5 s, the next attempt looks the message up in
Twilio's message log and sends only if it is not there. Window left: Twilio's
log lagging behind an accepted message by more than that margin.

A helper's picture goes with the first part as MMS (`media_url`, a link of
`channels.media_links` that Twilio fetches); a picture over Twilio's MMS limit, or
one Twilio refuses, is logged and the text goes alone.

Right before a reply's first part goes out, its parts are taken from the
global hourly cap (`channels.outbound_cap`); past the cap the reply is held
for the next hour. Retries, logs and metrics are every channel's
(`channels.delivery`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from typing import Any, ClassVar

import requests
from celery import Task
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

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
from channels.media_links import picture_link
from channels.outbound_cap import OutboundCap
from channels.plaintext import plain_text
from channels.sms.split import split_for_sms
from channels.sms.state import SmsState, number_id
from kernel.contract import ChatMessage, Reply, delivery_task
from kernel.replication import make_durable
from kernel.settings import Settings, get_settings
from workers.app import app

log = logging.getLogger(__name__)

# Twilio error codes that mean "this number will never take this message".
OPTED_OUT_CODES = frozenset({21610})  # the recipient replied STOP to this sender
# Twilio takes at most 5 MB of media per MMS (PNG, JPEG, GIF formatted for phones).
TWILIO_MMS_MAX_BYTES = 5_000_000


class SmsNotConfiguredError(RuntimeError):
    """A Twilio setting needed to send is missing; the message names it."""


class AmbiguousSendError(TransientDeliveryError):
    """No answer from Twilio (timeout, connection lost): the message may have been created."""


class TwilioSender:
    """Twilio's own REST client, pointed at GPT4P_TWILIO_API_BASE, with a timeout."""

    def __init__(self, settings: Settings) -> None:
        if not settings.twilio_account_sid or settings.twilio_auth_token is None:
            raise SmsNotConfiguredError(
                "set GPT4P_TWILIO_ACCOUNT_SID and GPT4P_TWILIO_AUTH_TOKEN to send SMS"
            )
        self.settings = settings
        self.client = Client(
            settings.twilio_account_sid,
            settings.twilio_auth_token.get_secret_value(),
            http_client=TwilioHttpClient(timeout=settings.twilio_timeout),
        )
        self.client.api.base_url = settings.twilio_api_base.rstrip("/")

    def send(self, to: str, sender: str | None, body: str, media_url: str | None = None) -> str:
        """Send one message (an MMS with the picture at `media_url`); return its SID or raise
        Transient/PermanentDeliveryError."""
        options: dict[str, Any] = {"to": to, "body": body}
        if media_url is not None:
            options["media_url"] = [media_url]
        options.update(self.origin(sender))
        try:
            return str(self.client.messages.create(**options).sid)
        except TwilioRestException as error:
            if error.status == 429 or error.status >= 500:
                raise TransientDeliveryError(f"Twilio answered {error.status}") from error
            raise PermanentDeliveryError(
                f"Twilio refused the message ({error.status}, code {error.code})", error.code
            ) from error
        except requests.RequestException as error:
            raise AmbiguousSendError(
                f"no answer from Twilio: {error.__class__.__name__}"
            ) from error

    def origin(self, sender: str | None) -> dict[str, str]:
        """Whom a message comes from: the Messaging Service, else GPT4P_TWILIO_FROM, else
        `sender` (the number texted)."""
        if self.settings.twilio_messaging_service_sid:
            return {"messaging_service_sid": self.settings.twilio_messaging_service_sid}
        origin = self.settings.twilio_from or sender
        if not origin:
            raise PermanentDeliveryError("no sender: set GPT4P_TWILIO_FROM")
        return {"from_": origin}

    def parts_of(self, markdown: str, max_parts: int) -> list[str]:
        """A reply as the messages that carry it: plain text (a phone shows ``**`` as
        typed), in numbered parts of Twilio's 1,600 characters."""
        return split_for_sms(plain_text(markdown), max_parts=max_parts)

    def find_sent(self, to: str, sender: str | None, body: str, since: float) -> str | None:
        """The SID of a message Twilio already has from us to `to` with `body`, if any."""
        options: dict[str, Any] = {"to": to, "limit": 100}
        options["date_sent_after"] = datetime.fromtimestamp(since - 86_400, UTC)
        try:
            for message in self.client.messages.list(**options):
                if message.body == body:
                    return str(message.sid)
        except TwilioRestException as error:
            raise TransientDeliveryError(
                f"Twilio message log unavailable ({error.status})"
            ) from error
        except requests.RequestException as error:
            raise TransientDeliveryError(
                f"Twilio unreachable: {error.__class__.__name__}"
            ) from error
        return None


@lru_cache(maxsize=1)
def _sender() -> TwilioSender:
    return TwilioSender(get_settings())


def send_parts(
    reply: Reply, sender: TwilioSender, state: SmsState, max_parts: int,
    cap: OutboundCap | None = None,
) -> int:  # fmt: skip
    """Send every part of `reply` not sent yet; return how many were sent now.

    A part is claimed before the send and recorded after it. A claim left by a
    delivery that died, or that got no answer from Twilio, is settled by asking
    Twilio's message log before sending again, so a part is never sent twice.
    The parts still to send are taken from `cap` together, before the first of
    them goes out: the hourly cap holds a reply whole, never cuts it in two.
    The model's markdown is written as the channel shows it (`TwilioSender.parts_of`).
    """
    parts = sender.parts_of(reply.text, max_parts)
    return send_each_once(
        len(parts),
        claim=lambda index: _claim_part(reply, index, parts[index], sender, state),
        send=lambda index: _send_part(
            reply, index, parts[index], sender, state, with_picture=index == 0
        ),
        release=lambda index: state.release_part(reply.job_id, index),
        cap=cap,
        maybe_sent=AmbiguousSendError,
    )


def _claim_part(reply: Reply, index: int, body: str, sender: TwilioSender, state: SmsState) -> bool:
    """Claim part `index` for sending now; False when it was sent already."""
    stale_after = sender.settings.twilio_timeout + 5
    claim, started = state.claim_part(reply.job_id, index, stale_after)
    if claim == "sent":
        return False
    if claim == "in_flight":
        raise TransientDeliveryError(f"part {index} is being sent by another delivery")
    if claim == "unknown":
        existing = sender.find_sent(reply.reply_to, reply.reply_from, body, started)
        if existing is not None:
            log.info("part %d of %s was already accepted by Twilio", index, reply.job_id)
            state.record_part(reply.job_id, index, existing)
            return False
        state.reclaim_part(reply.job_id, index)
    return True


def _send_part(
    reply: Reply, index: int, body: str, sender: TwilioSender, state: SmsState,
    with_picture: bool = False,
) -> None:  # fmt: skip
    """Send claimed part `index` (with the reply's picture, if asked and it has one) and
    record its SID; a failed send frees the claim."""
    # The claim (and the picture Twilio will fetch) must survive a failover before the
    # send, which cannot be undone.
    with freed_if_unsent(lambda: state.release_part(reply.job_id, index)):
        media_url = None
        if with_picture:
            media_url = picture_link(state.redis, state.settings, reply, TWILIO_MMS_MAX_BYTES)
        make_durable(state.redis, state.settings)
    try:
        sid = _send_with_picture(reply, body, sender, media_url)
    except AmbiguousSendError:
        raise  # keep the claim: the next attempt asks Twilio before sending again
    except (TransientDeliveryError, PermanentDeliveryError):
        state.release_part(reply.job_id, index)
        raise
    state.record_part(reply.job_id, index, sid)


def _send_with_picture(reply: Reply, body: str, sender: TwilioSender, media_url: str | None) -> str:
    """Send `body` with the picture; when Twilio refuses the MMS (a sender or a country
    without MMS, the picture), send the text alone rather than nothing."""
    if media_url is None:
        return sender.send(reply.reply_to, reply.reply_from, body)
    try:
        return sender.send(reply.reply_to, reply.reply_from, body, media_url)
    except PermanentDeliveryError as error:
        if error.code in OPTED_OUT_CODES:
            raise
        log.warning("reply %s: Twilio refused it as MMS (code %s); sending the text alone",
                    reply.job_id, error.code)  # fmt: skip
        return sender.send(reply.reply_to, reply.reply_from, body)


class SmsDelivery(Delivery):
    """A reply's delivery by SMS: to a number that has not opted out, in parts."""

    channel = "sms"
    nothing_sent: ClassVar[dict[str, Any]] = {"sent": 0}

    @property
    def policy(self) -> DeliveryPolicy:
        """SMS retries (GPT4P_SMS_MAX_RETRIES, GPT4P_SMS_RETRY_BACKOFF) and hourly cap."""
        return DeliveryPolicy(
            max_retries=self.settings.sms_max_retries,
            backoff_s=self.settings.sms_retry_backoff,
            backoff_ceiling_s=300.0,
            per_hour=self.settings.sms_max_per_hour,
        )

    @cached_property
    def recipient(self) -> str:
        """The number's pseudonym (`number_id`)."""
        return number_id(self.reply.reply_to)

    @cached_property
    def state(self) -> SmsState:
        """What the SMS channel keeps in Redis: part claims, opt-outs, conversations."""
        return SmsState(self.redis, self.settings)

    @property
    def sender(self) -> TwilioSender:
        """Twilio's client, as this channel sends (`origin`, `parts_of`)."""
        return _sender()

    @property
    def max_parts(self) -> int:
        """Most messages one reply is sent in (GPT4P_SMS_MAX_PARTS)."""
        return self.settings.sms_max_parts

    def send(self) -> Outcome:
        """Send the parts not sent yet; the reply joins the number's conversation."""
        reply = self.reply
        if self.state.is_opted_out(reply.reply_to):
            log.info("reply %s not sent: %s opted out", reply.job_id, self.recipient)
            return Outcome("opted_out", {"sent": 0})
        sent = send_parts(reply, self.sender, self.state, self.max_parts, self.cap())
        if reply.engine != "keyword":
            self.state.remember(reply.reply_to, ChatMessage(role="assistant", content=reply.text))
        return Outcome(DELIVERED, {"sent": sent}, how=f" in {sent} part(s)")

    def refused(self, error: PermanentDeliveryError) -> dict[str, Any]:
        """A number that replied STOP is opted out: nothing more is sent to it."""
        if error.code in OPTED_OUT_CODES:
            self.state.opt_out(self.reply.reply_to)
        return {"sent": 0, "code": error.code}


@app.task(name=delivery_task("sms"), bind=True, max_retries=None)
def deliver_sms(self: Task, reply_data: dict[str, Any]) -> dict[str, Any]:
    """Send a reply by SMS: split, each part once, transient failures retried with backoff."""
    return SmsDelivery(self, Reply.model_validate(reply_data)).run()
