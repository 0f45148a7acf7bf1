"""Sending SMS replies through Twilio's REST API, each part exactly once.

The task on queue ``deliver.sms`` splits the reply, and for every part claims
it in Redis before the send and records Twilio's message SID after it. A
retried task (Twilio 429/5xx) skips the parts already sent. A part whose send
got no answer (a timeout), or whose delivery worker died between Twilio
accepting it and the SID being recorded, stays claimed; once the claim is
older than the Twilio timeout + 5 s, the next attempt looks the message up in
Twilio's message log and sends only if it is not there. Window left: Twilio's
log lagging behind an accepted message by more than that margin.

Right before a reply's first part goes out, its parts are taken from the
global hourly cap (`channels.outbound_cap`); past the cap the reply is held
for the next hour.
"""

from __future__ import annotations

import contextlib
import logging
import random
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import redis
import requests
from celery import Task
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from channels.outbound_cap import OutboundCap, OutboundCappedError, Reservation, hold
from channels.sms.split import split_for_sms
from channels.sms.state import SmsState, number_id
from kernel.contract import ChatMessage, Reply, delivery_task
from kernel.logs import bind_job
from kernel.metrics import Metrics
from kernel.replication import make_durable
from kernel.settings import Settings, get_settings
from workers.app import app, broker_redis

log = logging.getLogger(__name__)

# Twilio error codes that mean "this number will never take this message".
OPTED_OUT_CODES = frozenset({21610})  # the recipient replied STOP to this sender


class SmsNotConfiguredError(RuntimeError):
    """A Twilio setting needed to send is missing; the message names it."""


class TransientSendError(RuntimeError):
    """Twilio answered that it did not take the message now (429, 5xx): send it again later."""


class AmbiguousSendError(TransientSendError):
    """No answer from Twilio (timeout, connection lost): the message may have been created."""


class PermanentSendError(RuntimeError):
    """Twilio will never accept this send (invalid number, unsubscribed recipient, ...)."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


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

    def send(self, to: str, sender: str | None, body: str) -> str:
        """Send one message; return its SID or raise Transient/PermanentSendError."""
        options: dict[str, Any] = {"to": to, "body": body}
        if self.settings.twilio_messaging_service_sid:
            options["messaging_service_sid"] = self.settings.twilio_messaging_service_sid
        else:
            options["from_"] = self.settings.twilio_from or sender
            if not options["from_"]:
                raise PermanentSendError("no sender: set GPT4P_TWILIO_FROM", None)
        try:
            return str(self.client.messages.create(**options).sid)
        except TwilioRestException as error:
            if error.status == 429 or error.status >= 500:
                raise TransientSendError(f"Twilio answered {error.status}") from error
            raise PermanentSendError(
                f"Twilio refused the message ({error.status}, code {error.code})", error.code
            ) from error
        except requests.RequestException as error:
            raise AmbiguousSendError(
                f"no answer from Twilio: {error.__class__.__name__}"
            ) from error

    def find_sent(self, to: str, sender: str | None, body: str, since: float) -> str | None:
        """The SID of a message Twilio already has from us to `to` with `body`, if any."""
        options: dict[str, Any] = {"to": to, "limit": 100}
        options["date_sent_after"] = datetime.fromtimestamp(since - 86_400, UTC)
        try:
            for message in self.client.messages.list(**options):
                if message.body == body:
                    return str(message.sid)
        except TwilioRestException as error:
            raise TransientSendError(f"Twilio message log unavailable ({error.status})") from error
        except requests.RequestException as error:
            raise TransientSendError(f"Twilio unreachable: {error.__class__.__name__}") from error
        return None


@lru_cache(maxsize=1)
def _sender() -> TwilioSender:
    return TwilioSender(get_settings())


def _state() -> SmsState:
    return SmsState(broker_redis(), get_settings())


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
    """
    parts = split_for_sms(reply.text, max_parts=max_parts)
    sent, reservation = 0, None
    try:
        for index, body in enumerate(parts):
            if not _claim_part(reply, index, body, sender, state):
                continue
            if reservation is None and cap is not None:
                reservation = _reserve(cap, len(parts) - index, reply, index, state)
            try:
                _send_part(reply, index, body, sender, state)
            except AmbiguousSendError:
                if reservation is not None:
                    reservation.use()  # it may have gone out: it counts
                raise
            if reservation is not None:
                reservation.use()
            sent += 1
    finally:
        if reservation is not None:
            reservation.give_back()
    return sent


def _claim_part(reply: Reply, index: int, body: str, sender: TwilioSender, state: SmsState) -> bool:
    """Claim part `index` for sending now; False when it was sent already."""
    stale_after = sender.settings.twilio_timeout + 5
    claim, started = state.claim_part(reply.job_id, index, stale_after)
    if claim == "sent":
        return False
    if claim == "in_flight":
        raise TransientSendError(f"part {index} is being sent by another delivery")
    if claim == "unknown":
        existing = sender.find_sent(reply.reply_to, reply.reply_from, body, started)
        if existing is not None:
            log.info("part %d of %s was already accepted by Twilio", index, reply.job_id)
            state.record_part(reply.job_id, index, existing)
            return False
        state.reclaim_part(reply.job_id, index)
    return True


def _reserve(
    cap: OutboundCap, count: int, reply: Reply, index: int, state: SmsState
) -> Reservation:
    """`count` sends from this hour's cap; part `index` is freed again when there are none."""
    try:
        return cap.take(count)
    except (OutboundCappedError, redis.RedisError):
        with contextlib.suppress(redis.RedisError):  # nothing was sent: free it for a retry
            state.release_part(reply.job_id, index)
        raise


def _send_part(reply: Reply, index: int, body: str, sender: TwilioSender, state: SmsState) -> None:
    """Send claimed part `index` and record its SID; a failed send frees the claim."""
    # The claim must survive a failover before the send, which cannot be undone.
    try:
        make_durable(state.redis, state.settings)
    except redis.RedisError:
        with contextlib.suppress(redis.RedisError):  # nothing was sent: free it for a retry
            state.release_part(reply.job_id, index)
        raise
    try:
        sid = sender.send(reply.reply_to, reply.reply_from, body)
    except AmbiguousSendError:
        raise  # keep the claim: the next attempt asks Twilio before sending again
    except (TransientSendError, PermanentSendError):
        state.release_part(reply.job_id, index)
        raise
    state.record_part(reply.job_id, index, sid)


def _backoff(settings: Settings, retries: int) -> float:
    delay = min(settings.sms_retry_backoff * 2**retries, 300.0)
    return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security


@app.task(name=delivery_task("sms"), bind=True, max_retries=None)
def deliver_sms(self: Task, reply_data: dict[str, Any]) -> dict[str, Any]:
    """Send a reply by SMS: split, each part once, transient failures retried with backoff."""
    reply = Reply.model_validate(reply_data)
    with bind_job(reply.job_id):
        try:
            return _deliver(self, reply)
        except OutboundCappedError as capped:
            settings = get_settings()
            return hold(self, reply, capped, settings.outbound_hold_max_age, broker_redis())


def _deliver(self: Task, reply: Reply) -> dict[str, Any]:
    settings = get_settings()
    who = number_id(reply.reply_to)
    state = _state()
    if state.is_opted_out(reply.reply_to):
        log.info("reply %s not sent: %s opted out", reply.job_id, who)
        return {"sent": 0, "status": "opted_out"}
    cap = OutboundCap(state.redis, "sms", settings.sms_max_per_hour)
    try:
        sent = send_parts(reply, _sender(), state, settings.sms_max_parts, cap)
    except TransientSendError as error:
        if self.request.retries >= settings.sms_max_retries:
            log.error("reply %s to %s abandoned after %d retries: %s",
                      reply.job_id, who, self.request.retries, error)  # fmt: skip
            Metrics(state.redis).count("gpt4p_delivery_failures",
                                       {"channel": "sms", "reason": "abandoned"})  # fmt: skip
            return {"sent": 0, "status": "abandoned"}
        log.warning("reply %s to %s: %s; retrying", reply.job_id, who, error)
        raise self.retry(countdown=_backoff(settings, self.request.retries)) from None
    except PermanentSendError as error:
        log.warning("reply %s to %s refused: %s", reply.job_id, who, error)
        if error.code in OPTED_OUT_CODES:
            state.opt_out(reply.reply_to)
        Metrics(state.redis).count("gpt4p_delivery_failures",
                                   {"channel": "sms", "reason": "refused"})  # fmt: skip
        return {"sent": 0, "status": "refused", "code": error.code}
    if reply.engine != "keyword":
        state.remember(reply.reply_to, ChatMessage(role="assistant", content=reply.text))
    log.info("reply %s sent to %s in %d part(s)", reply.job_id, who, sent)
    Metrics(state.redis).count("gpt4p_deliveries", {"channel": "sms"})
    return {"sent": sent, "status": "delivered"}
