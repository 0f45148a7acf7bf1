"""Sending email replies by SMTP: threaded, marked as automatic, and sent once.

A reply's Message-ID is derived from its job, and the send is claimed in
Redis before and recorded after; a retried task that finds the record does
not send again. Remaining window: a worker killed after the SMTP server
accepted the mail and before the record is written resends it after
SEND_IN_FLIGHT_TTL_S, with the same Message-ID, which mail clients show once.
Right before the send, the reply takes its slot of the global hourly cap
(`channels.outbound_cap`); past the cap it is held for the next hour.
"""

from __future__ import annotations

import base64
import contextlib
import html
import logging
import random
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formataddr, formatdate, parseaddr
from typing import Any, cast

import redis
from celery import Task

from channels.email.intake import PREFIX, EmailRecords, digest, owner_key
from channels.email.parse import base_subject, one_line
from channels.outbound_cap import OutboundCap, OutboundCappedError, Reservation, hold
from kernel.contract import ChatMessage, Reply, delivery_task
from kernel.logs import bind_job
from kernel.metrics import Metrics
from kernel.replication import make_durable
from kernel.settings import Settings, get_settings
from workers.app import app, broker_redis

log = logging.getLogger(__name__)

SEND_IN_FLIGHT_TTL_S = 300
SENT_TTL_S = 90 * 24 * 3600
QUOTE_LINES = 6


class TransientSmtpError(RuntimeError):
    """The server may take the mail later (4xx, timeout, connection lost)."""


class PermanentSmtpError(RuntimeError):
    """The server will not take this mail (5xx)."""


def reply_message_id(reply: Reply, sender: str) -> str:
    """A Message-ID stable across retries of the same reply."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "gpt4people.invalid"
    return f"<gpt4p-{reply.job_id}@{domain}>"


def _quote(reply: Reply) -> str:
    """A short quote of the question, only when our server authenticated its sender.

    Anyone can put a stranger's address in From: quoting that mail would send the
    stranger whatever text the forger chose (backscatter), so an unauthenticated
    mail is answered without a word of it, nor the display name it gave.
    """
    if reply.context.get("authenticated") != "true":
        return ""
    question = reply.context.get("question", "").strip().splitlines()
    if not question:
        return ""
    lines = question[:QUOTE_LINES] + (["..."] if len(question) > QUOTE_LINES else [])
    who = reply.context.get("sender_name") or "you"
    when = reply.context.get("date", "")
    intro = f"On {when}, {who} wrote:" if when else f"{who} wrote:"
    return intro + "\n" + "\n".join(f"> {line}" for line in lines)


def compose_reply(reply: Reply, settings: Settings) -> EmailMessage:
    """The reply mail: to the asker, ``Re:`` once, threaded, marked auto-replied."""
    sender = settings.email_from or reply.reply_from or ""
    original = reply.context.get("message_id", "")
    references = [r for r in reply.context.get("references", "").split() if r]
    if original and original not in references:
        references.append(original)
    message = EmailMessage()
    message["From"] = formataddr(("GPT4People", parseaddr(sender)[1]))
    # Every header built from the asker's mail is made one line: a line break in a
    # decoded Subject would make the email package refuse the reply outright.
    message["To"] = one_line(reply.reply_to)
    message["Subject"] = "Re: " + (
        base_subject(one_line(reply.context.get("subject", ""))) or "your question"
    )
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = reply_message_id(reply, sender)
    if original:
        message["In-Reply-To"] = one_line(original)
    if references:
        message["References"] = one_line(" ".join(references[-20:]))
    # RFC 3834: tells other robots not to answer us, which prevents mail loops.
    message["Auto-Submitted"] = "auto-replied"
    message["X-Auto-Response-Suppress"] = "All"
    quote = _quote(reply)
    message.set_content(reply.text + ("\n\n" + quote if quote else "") + "\n")
    if settings.email_html:
        paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in reply.text.split("\n\n"))
        quoted = f"<blockquote>{html.escape(quote).replace(chr(10), '<br>')}</blockquote>"
        message.add_alternative(f"<html><body>{paragraphs}{quoted if quote else ''}</body></html>",
                                subtype="html")  # fmt: skip
    image, kind = reply.context.get("image_base64"), reply.context.get("image_type", "")
    if image and kind.startswith("image/"):
        subtype = kind.split("/", 1)[1]
        message.add_attachment(base64.b64decode(image), maintype="image", subtype=subtype,
                               filename=f"image.{subtype}")  # fmt: skip
    return message


def send_smtp(message: EmailMessage, settings: Settings) -> None:
    """Hand `message` to the SMTP server, classifying failures as transient or permanent."""
    if not settings.smtp_host:
        raise PermanentSmtpError("set GPT4P_SMTP_HOST to send email")
    context = ssl.create_default_context()
    try:
        if settings.smtp_ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout,
                context=context,
            )  # fmt: skip
        else:
            smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port,
                                timeout=settings.smtp_timeout)  # fmt: skip
        with smtp:
            if settings.smtp_starttls and not settings.smtp_ssl:
                smtp.starttls(context=context)
            if settings.smtp_user and settings.smtp_password:
                smtp.login(settings.smtp_user, settings.smtp_password.get_secret_value())
            smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused as error:
        codes = [code for code, _ in error.recipients.values()]
        if all(400 <= code < 500 for code in codes):
            raise TransientSmtpError(f"recipient deferred ({codes})") from error
        raise PermanentSmtpError(f"recipient refused ({codes})") from error
    except smtplib.SMTPResponseException as error:
        if 400 <= error.smtp_code < 500:
            raise TransientSmtpError(f"SMTP {error.smtp_code}") from error
        raise PermanentSmtpError(f"SMTP {error.smtp_code}") from error
    except (TimeoutError, smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, OSError) as e:
        raise TransientSmtpError(f"SMTP unreachable ({e.__class__.__name__})") from e


def _backoff(settings: Settings, retries: int) -> float:
    delay = min(settings.email_retry_backoff * 2**retries, 600.0)
    return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security


@app.task(name=delivery_task("email"), bind=True, max_retries=None)
def deliver_email(self: Task, reply_data: dict[str, Any]) -> dict[str, Any]:
    """Send a reply by email once; transient SMTP failures are retried with backoff."""
    reply = Reply.model_validate(reply_data)
    with bind_job(reply.job_id):
        try:
            return _deliver(self, reply)
        except OutboundCappedError as capped:
            settings = get_settings()
            return hold(self, reply, capped, settings.outbound_hold_max_age, broker_redis())


def _take_slot(client: redis.Redis, key: str, settings: Settings) -> Reservation:
    """One send from this hour's email cap; the claim `key` is freed when there is none."""
    try:
        return OutboundCap(client, "email", settings.email_max_per_hour).take()
    except (OutboundCappedError, redis.RedisError):
        with contextlib.suppress(redis.RedisError):  # nothing was sent: free it for a retry
            client.delete(key)
        raise


def _deliver(self: Task, reply: Reply) -> dict[str, Any]:
    settings = get_settings()
    client = broker_redis()
    who = digest(reply.reply_to.lower())
    key = f"{PREFIX}sent:{reply.job_id}"
    if not client.set(key, "sending", nx=True, ex=SEND_IN_FLIGHT_TTL_S):
        state = cast(bytes | None, client.get(key))
        if state != b"sending":
            return {"status": "already sent"}
        raise self.retry(countdown=_backoff(settings, self.request.retries))
    try:
        make_durable(client, settings)  # the claim survives a failover before the send
    except redis.RedisError:
        with contextlib.suppress(redis.RedisError):  # nothing was sent: free it for a retry
            client.delete(key)
        raise
    message = compose_reply(reply, settings)
    reservation = _take_slot(client, key, settings)
    try:
        send_smtp(message, settings)
    except TransientSmtpError as error:
        reservation.give_back()
        client.delete(key)
        if self.request.retries >= settings.email_max_retries:
            log.error("reply %s to %s abandoned: %s", reply.job_id, who, error)
            Metrics(client).count("gpt4p_delivery_failures",
                                  {"channel": "email", "reason": "abandoned"})  # fmt: skip
            return {"status": "abandoned"}
        log.warning("reply %s to %s: %s; retrying", reply.job_id, who, error)
        raise self.retry(countdown=_backoff(settings, self.request.retries)) from None
    except PermanentSmtpError as error:
        reservation.give_back()
        client.set(key, "refused", ex=SENT_TTL_S)
        log.warning("reply %s to %s refused: %s", reply.job_id, who, error)
        Metrics(client).count("gpt4p_delivery_failures", {"channel": "email", "reason": "refused"})
        return {"status": "refused"}
    message_id = str(message["Message-ID"])
    client.set(key, message_id, ex=SENT_TTL_S)
    # The answer joins the thread of those who saw it (see EmailChannel.to_job).
    owners = reply.context.get("thread_owners", "").split() or [owner_key(reply.reply_to)]
    answer = ChatMessage(role="assistant", content=reply.text)
    EmailRecords(client).remember_turn(owners, message_id, answer)
    log.info("reply %s sent to %s", reply.job_id, who)
    Metrics(client).count("gpt4p_deliveries", {"channel": "email"})
    return {"status": "delivered", "message_id": message_id}
