"""Sending email replies by SMTP: threaded, marked as automatic, and sent once.

A reply's Message-ID is derived from its job, and the send is claimed in
Redis before and recorded after; a retried task that finds the record does
not send again. Remaining window: a worker killed after the SMTP server
accepted the mail and before the record is written resends it after
SEND_IN_FLIGHT_TTL_S, with the same Message-ID, which mail clients show once.
Right before the send, the reply takes its slot of the global hourly cap
(`channels.outbound_cap`); past the cap it is held for the next hour.
Retries, logs and metrics are every channel's (`channels.delivery`).
"""

from __future__ import annotations

import base64
import html
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formataddr, formatdate, parseaddr
from functools import cached_property
from typing import Any, cast

from celery import Task

from channels.delivery import (
    DELIVERED,
    Delivery,
    DeliveryPolicy,
    Outcome,
    PermanentDeliveryError,
    TransientDeliveryError,
    freed_if_unsent,
)
from channels.email.intake import PREFIX, EmailRecords, digest, owner_key
from channels.email.parse import base_subject, one_line
from channels.plaintext import plain_text, safe_html
from kernel.contract import ChatMessage, Reply, delivery_task
from kernel.replication import make_durable
from kernel.settings import Settings
from workers.app import app

SEND_IN_FLIGHT_TTL_S = 300
SENT_TTL_S = 90 * 24 * 3600
QUOTE_LINES = 6


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
    # The model writes markdown: plain text for the text/plain part, rendered (the
    # model's own HTML escaped) for the HTML alternative.
    message.set_content(plain_text(reply.text) + ("\n\n" + quote if quote else "") + "\n")
    if settings.email_html:
        quoted = f"<blockquote>{html.escape(quote).replace(chr(10), '<br>')}</blockquote>"
        answer = safe_html(reply.text)
        message.add_alternative(f"<html><body>{answer}{quoted if quote else ''}</body></html>",
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
        raise PermanentDeliveryError("set GPT4P_SMTP_HOST to send email")
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
            raise TransientDeliveryError(f"recipient deferred ({codes})") from error
        raise PermanentDeliveryError(f"recipient refused ({codes})") from error
    except smtplib.SMTPResponseException as error:
        if 400 <= error.smtp_code < 500:
            raise TransientDeliveryError(f"SMTP {error.smtp_code}") from error
        raise PermanentDeliveryError(f"SMTP {error.smtp_code}") from error
    except (TimeoutError, smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, OSError) as e:
        raise TransientDeliveryError(f"SMTP unreachable ({e.__class__.__name__})") from e


class EmailDelivery(Delivery):
    """A reply's delivery by email: one mail, sent once, in the asker's thread."""

    channel = "email"

    @property
    def policy(self) -> DeliveryPolicy:
        """Email retries (GPT4P_EMAIL_MAX_RETRIES, GPT4P_EMAIL_RETRY_BACKOFF) and hourly cap."""
        return DeliveryPolicy(
            max_retries=self.settings.email_max_retries,
            backoff_s=self.settings.email_retry_backoff,
            backoff_ceiling_s=600.0,
            per_hour=self.settings.email_max_per_hour,
        )

    @cached_property
    def recipient(self) -> str:
        """The address's digest."""
        return digest(self.reply.reply_to.lower())

    def send(self) -> Outcome:
        """Send the mail unless it was sent; the answer joins the thread of those who saw it."""
        reply, client = self.reply, self.redis
        key = f"{PREFIX}sent:{reply.job_id}"
        if not client.set(key, "sending", nx=True, ex=SEND_IN_FLIGHT_TTL_S):
            if cast(bytes | None, client.get(key)) != b"sending":
                return Outcome("already sent")
            # Another delivery is sending it: wait for its record, however many tries that
            # takes (its claim expires after SEND_IN_FLIGHT_TTL_S if it died).
            raise self.retry_later()
        with freed_if_unsent(lambda: client.delete(key)):
            make_durable(client, self.settings)  # the claim survives a failover before the send
            message = compose_reply(reply, self.settings)
            reservation = self.cap().take()
        try:
            send_smtp(message, self.settings)
        except TransientDeliveryError:
            reservation.give_back()
            client.delete(key)
            raise
        except PermanentDeliveryError:
            reservation.give_back()
            client.set(key, "refused", ex=SENT_TTL_S)
            raise
        message_id = str(message["Message-ID"])
        client.set(key, message_id, ex=SENT_TTL_S)
        # The answer joins the thread of those who saw it (see EmailChannel.to_job).
        owners = reply.context.get("thread_owners", "").split() or [owner_key(reply.reply_to)]
        answer = ChatMessage(role="assistant", content=reply.text)
        EmailRecords(client).remember_turn(owners, message_id, answer)
        return Outcome(DELIVERED, {"message_id": message_id})


@app.task(name=delivery_task("email"), bind=True, max_retries=None)
def deliver_email(self: Task, reply_data: dict[str, Any]) -> dict[str, Any]:
    """Send a reply by email once; transient SMTP failures are retried with backoff."""
    return EmailDelivery(self, Reply.model_validate(reply_data)).run()
