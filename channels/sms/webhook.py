"""The SMS channel: Twilio's webhook in, a job (or a keyword answer) out.

``POST /sms`` verifies Twilio's signature, answers at once with an empty TwiML
``<Response/>`` and queues the work; the reply is sent later by the
``deliver.sms`` task (`channels.sms.delivery`). A MessageSid already seen within
GPT4P_SMS_REPLAY_WINDOW_DAYS gets the same empty answer and nothing else: Twilio's
retries and replays of a signed webhook (which carries no signed timestamp).

WhatsApp through Twilio is this channel with its own records and texts
(`channels.whatsapp`): `twilio_webhook` serves both routes, and a message from a
``whatsapp:`` sender posted to ``/sms`` is handed to WhatsApp once its signature
(for ``/sms``) is checked.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Annotated, Any, ClassVar, Self

import redis
from celery import Celery
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from channels.base import InvalidInboundError
from channels.sms.spool import InboundSpool
from channels.sms.state import SmsState, number_id
from kernel.contract import ChatMessage, GenerationOptions, Job, MediaRef, Reply
from kernel.metrics import Metrics
from kernel.redis_client import RedisUnavailableError, redis_client
from kernel.replication import make_durable
from kernel.settings import Settings
from workers.client import enqueue_delivery, submit

log = logging.getLogger(__name__)

OPT_OUT_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_KEYWORDS = frozenset({"START", "UNSTOP"})
HELP_KEYWORDS = frozenset({"HELP", "INFO"})
RESET_KEYWORDS = frozenset({"RESET"})

HELP_TEXT = (
    "GPT4People: text any question and an AI model answers by SMS. "
    "RESET starts a new conversation. STOP ends all messages, START resumes them."
)
RESET_TEXT = "Done: our conversation is cleared. What would you like to ask?"
RATE_TEXT = "You've sent a lot of messages. Please wait a while before texting again."
TOO_LONG_TEXT = "Your message is {length} characters long; please keep it under {limit}."
EMPTY_TEXT = "Send me a question by text and I'll answer it."
SMS_BREVITY = " You are answering by SMS: reply in one or two short sentences, in plain text."
WHATSAPP_PREFIX = "whatsapp:"  # how Twilio writes a WhatsApp sender in From and To


class ForbiddenWebhookError(PermissionError):
    """The webhook is not from our Twilio account; answered with 403."""


class SmsInbound(BaseModel):
    """The fields of Twilio's incoming-message webhook that we use."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    message_sid: str = Field(alias="MessageSid", pattern=r"^[A-Z]{2}[0-9a-fA-F]{32}$")
    account_sid: str = Field(alias="AccountSid", pattern=r"^AC[0-9a-fA-F]{32}$")
    sender: str = Field(alias="From", min_length=1, max_length=64)
    recipient: str = Field(alias="To", min_length=1, max_length=64)
    body: str = Field("", alias="Body", max_length=20_000)
    num_media: int = Field(0, alias="NumMedia", ge=0, le=10)
    media: list[MediaRef] = Field(default_factory=list)

    @field_validator("body")
    @classmethod
    def _printable(cls, body: str) -> str:
        # Control characters other than line breaks and tabs carry nothing a model can use.
        return "".join(c for c in body if c in "\n\t" or c.isprintable())

    @classmethod
    def from_form(cls, form: dict[str, str]) -> Self:
        """Parse Twilio's form fields, media included; raise `InvalidInboundError`."""
        try:
            inbound = cls.model_validate(form)
            media = [
                MediaRef(
                    url=form[f"MediaUrl{i}"], content_type=form.get(f"MediaContentType{i}", "")
                )
                for i in range(inbound.num_media)
                if f"MediaUrl{i}" in form
            ]
        except ValidationError as error:
            fields = sorted({str(e["loc"][0]) for e in error.errors() if e["loc"]})
            raise InvalidInboundError(f"invalid webhook fields: {', '.join(fields)}") from None
        return inbound.model_copy(update={"media": media})


def webhook_url(request: Request, settings: Settings) -> str:
    """The URL Twilio signed: GPT4P_PUBLIC_URL + path behind a proxy, else the request's."""
    if settings.public_url:
        query = f"?{request.url.query}" if request.url.query else ""
        return settings.public_url.rstrip("/") + request.url.path + query
    return str(request.url)


def verify_signature(url: str, form: dict[str, str], signature: str | None, token: str) -> None:
    """Raise `ForbiddenWebhookError` unless Twilio signed these exact URL and fields."""
    if not signature or not RequestValidator(token).validate(url, form, signature):
        raise ForbiddenWebhookError("missing or wrong X-Twilio-Signature")


def _keyword(body: str) -> str:
    return body.strip().strip(".!").upper()


def _duplicate(state: SmsState, seen_days_ago: int, channel: str) -> str:
    """Count a webhook whose MessageSid was seen before (Twilio's retry, or a replay)."""
    Metrics(state.redis).count("gpt4p_webhook_duplicates", {"channel": channel})
    return f"duplicate (first seen {seen_days_ago} day(s) ago)"


class SmsChannel:
    """Turns a verified webhook into a job, or answers a keyword itself."""

    name = "sms"
    label = "SMS"  # in log lines
    inbound_type: ClassVar[type[SmsInbound]] = SmsInbound
    state_type: ClassVar[type[SmsState]] = SmsState
    brevity = SMS_BREVITY  # added to the system prompt
    help_text = HELP_TEXT

    def __init__(self, settings: Settings, state: SmsState, celery: Celery) -> None:
        self.settings = settings
        self.state = state
        self.celery = celery

    @classmethod
    def on(cls, settings: Settings, client: Any, celery: Celery) -> Self:
        """The channel with its records (`state_type`) in the Redis of `client`."""
        return cls(settings, cls.state_type(client, settings), celery)

    @property
    def max_tokens(self) -> int:
        """The answer length asked of the model (GPT4P_SMS_MAX_TOKENS)."""
        return self.settings.sms_max_tokens

    def arrived(self, inbound: SmsInbound, at: float | None = None) -> None:
        """A message not seen before came in from `inbound.sender` at `at` (None: now; a
        spooled message's time of arrival otherwise). SMS notes nothing."""

    def to_job(self, inbound: object) -> Job:
        """A job for an ordinary message: the number's conversation, then this message."""
        if not isinstance(inbound, self.inbound_type):
            raise InvalidInboundError(f"expected a webhook of the {self.label} channel")
        system = ChatMessage(role="system", content=self.settings.system_prompt + self.brevity)
        history = self.state.history(inbound.sender)
        return Job(
            id=f"{self.name}-{inbound.message_sid}",
            channel=self.name,
            user=inbound.sender,
            messages=[system, *history, ChatMessage(role="user", content=inbound.body.strip())],
            options=GenerationOptions(max_tokens=self.max_tokens),
            reply_to=inbound.sender,
            reply_from=inbound.recipient,
            media=inbound.media,
            idempotency_key=inbound.message_sid,
        )

    def _answer(self, inbound: SmsInbound, text: str) -> None:
        reply = Reply(job_id=f"{self.name}-{inbound.message_sid}", channel=self.name,
                      reply_to=inbound.sender, reply_from=inbound.recipient, text=text,
                      model="none", engine="keyword")  # fmt: skip
        enqueue_delivery(self.celery, self.state.redis, reply)

    def receive(
        self, inbound: SmsInbound, replay: bool = False, arrived_at: float | None = None
    ) -> str:
        """Handle one message exactly once; return what was done (for the log).

        `replay` is for a message taken from the spool: its first attempt may have
        claimed the MessageSid before Redis failed, and everything below is
        idempotent per MessageSid, so the claim is not checked again.
        """
        state, number = self.state, inbound.sender
        seen_days_ago = state.claim_message(inbound.message_sid)
        if seen_days_ago is not None and not replay:
            return _duplicate(state, seen_days_ago, self.name)
        self.arrived(inbound, arrived_at)
        keyword = _keyword(inbound.body)
        if keyword in OPT_OUT_KEYWORDS:
            state.opt_out(number)
            return "opted out"
        if keyword in OPT_IN_KEYWORDS:
            state.opt_in(number)
            return "opted in"
        if state.is_opted_out(number):
            return "ignored (opted out)"
        verdict = state.rate_verdict(number)
        if verdict != "ok":
            if verdict == "notify":
                self._answer(inbound, RATE_TEXT)
            return f"rate limited ({verdict})"
        if keyword in HELP_KEYWORDS:
            self._answer(inbound, self.help_text)
            return "help"
        if keyword in RESET_KEYWORDS:
            state.forget(number)
            self._answer(inbound, RESET_TEXT)
            return "reset"
        length, limit = len(inbound.body), self.settings.sms_max_inbound_chars
        if length > limit:
            self._answer(inbound, TOO_LONG_TEXT.format(length=length, limit=limit))
            return "too long"
        if not inbound.body.strip() and not inbound.media:
            self._answer(inbound, EMPTY_TEXT)
            return "empty"
        job = self.to_job(inbound)
        submit(self.celery, job, client=self.state.redis)
        state.remember(number, job.messages[-1])
        return f"queued job {job.id}"

    def receive_durably(
        self, inbound: SmsInbound, replay: bool = False, arrived_at: float | None = None
    ) -> str:
        """`receive`, returning only once Redis replicas have what it wrote (when there are
        replicas), so that Twilio's 200 or the spool's forgetting survives a failover."""
        outcome = self.receive(inbound, replay, arrived_at)
        make_durable(self.state.redis, self.settings)
        return outcome


router = APIRouter()
EMPTY_TWIML = str(MessagingResponse())


def _twiml(status: int = 200) -> Response:
    return Response(EMPTY_TWIML, status_code=status, media_type="application/xml")


@router.post("/sms", response_model=None)
async def sms_webhook(
    request: Request,
    x_twilio_signature: Annotated[str | None, Header()] = None,
) -> Response:
    """Twilio's incoming-message webhook (WhatsApp's too, for a ``whatsapp:`` sender)."""
    return await twilio_webhook(request, x_twilio_signature, SmsChannel)


def _whatsapp_channel() -> type[SmsChannel]:
    """The WhatsApp channel (imported here, not above: it is built on this module)."""
    from channels.whatsapp.webhook import WhatsAppChannel

    return WhatsAppChannel


TWILIO_KINDS = ("sms", "whatsapp")  # what Twilio's webhooks spool


def twilio_channel(kind: str) -> type[SmsChannel] | None:
    """The channel of Twilio messages of `kind` ("sms", "whatsapp"); None for another kind."""
    if kind == "whatsapp":
        return _whatsapp_channel()
    return SmsChannel if kind == SmsChannel.name else None


def _channel_of(form: dict[str, str], route_channel: type[SmsChannel]) -> type[SmsChannel]:
    """WhatsApp for a ``whatsapp:`` sender (Twilio posts it wherever the sender's webhook
    points, /sms included), else the channel of the route."""
    if form.get("From", "").startswith(WHATSAPP_PREFIX):
        return _whatsapp_channel()
    return route_channel


async def twilio_webhook(
    request: Request, signature: str | None, route_channel: type[SmsChannel]
) -> Response:
    """Check that our Twilio account signed the URL it called, hand the message to its
    channel and answer with empty TwiML; spool it while Redis does not answer."""
    state = request.app.state
    settings: Settings = state.settings
    label = route_channel.label
    if settings.twilio_auth_token is None or settings.twilio_account_sid is None:
        log.error("%s webhook called but GPT4P_TWILIO_AUTH_TOKEN/ACCOUNT_SID are not set", label)
        return Response(f"{label} is not configured", status_code=503, media_type="text/plain")
    try:
        raw_form = await request.form(max_files=0, max_fields=200)
    except Exception:  # noqa: BLE001 - any unparsable body is the sender's fault
        return Response("the body must be form-encoded", status_code=400, media_type="text/plain")
    form = {k: v for k, v in raw_form.items() if isinstance(v, str)}
    token = settings.twilio_auth_token.get_secret_value()
    try:
        verify_signature(webhook_url(request, settings), form, signature, token)
        if form.get("AccountSid") != settings.twilio_account_sid:
            raise ForbiddenWebhookError("AccountSid is not ours")
    except ForbiddenWebhookError as error:
        log.warning("%s webhook refused: %s", label, error)  # never the message content
        return Response("forbidden", status_code=403, media_type="text/plain")
    channel_type = _channel_of(form, route_channel)
    try:
        inbound = channel_type.inbound_type.from_form(form)
    except InvalidInboundError as error:
        log.warning("%s webhook rejected: %s", channel_type.label, error)
        return Response(str(error), status_code=400, media_type="text/plain")
    channel = channel_type.on(settings, state.sync_redis, state.celery)
    try:
        outcome = await asyncio.to_thread(channel.receive_durably, inbound)
    except (RedisUnavailableError, redis.RedisError) as error:
        try:
            await asyncio.to_thread(state.spool.put, channel_type.name, form)
        except (OSError, sqlite3.Error) as spool_error:
            log.error("%s %s lost: Redis (%s) and spool (%s) unavailable", channel_type.label,
                      inbound.message_sid, error.__class__.__name__, spool_error)  # fmt: skip
            return Response("try again later", status_code=503, media_type="text/plain")
        log.warning("%s %s spooled: Redis unavailable (%s)", channel_type.label,
                    inbound.message_sid, error.__class__.__name__)  # fmt: skip
        return _twiml()
    log.info("%s %s from %s: %s", channel_type.label, inbound.message_sid,
             number_id(inbound.sender), outcome)  # fmt: skip
    return _twiml()


def drain_spool(spool: InboundSpool, settings: Settings, client: Any, celery: Celery) -> int:
    """Hand spooled Twilio messages (SMS, WhatsApp) to Redis, oldest first; stop at the
    first Redis failure."""
    drained = 0
    for item_id, kind, form, created in spool.pending_since(TWILIO_KINDS):
        channel = twilio_channel(kind)
        if channel is None:
            continue
        try:
            inbound = channel.inbound_type.from_form(form)
            outcome = channel.on(settings, client, celery).receive_durably(
                inbound, replay=True, arrived_at=created
            )
        except (RedisUnavailableError, redis.RedisError):
            break
        except InvalidInboundError:
            outcome = "dropped (invalid)"
        spool.remove(item_id)
        drained += 1
        log.info("spooled %s %s: %s", channel.label, form.get("MessageSid", "?"), outcome)
    return drained


def sync_redis_for(url: str, settings: Settings) -> Any:
    """A thread-safe Redis client for the webhook's work, which gives up within seconds.

    Twilio waits 15 s for the webhook's answer and never retries it: a Redis that does not
    answer must send the message to the spool in time, not after redis-py's default
    retries (about 9 s against a refused port, over 20 s against a host gone silent).
    """
    return redis_client(
        url, settings, socket_connect_timeout=2,
        socket_timeout=settings.redis_wait_timeout + 1,  # WAIT is its longest command
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), retries=1),
    )  # fmt: skip
