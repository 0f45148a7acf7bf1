"""Sending WhatsApp replies through Twilio's Messages API, each message exactly once.

The SMS delivery (`channels.sms.delivery`: parts claimed before and recorded
after each send, retries, the hourly cap, the picture with the first part),
with what WhatsApp changes:

- From is GPT4P_TWILIO_WHATSAPP_FROM exactly as written (``whatsapp:+E164``),
  else the Messaging Service, else the WhatsApp number the person wrote to;
- the model's markdown is written in WhatsApp's own formatting
  (`channels.plaintext.whatsapp_text`), in parts of 1,600 characters;
- WhatsApp takes a free-form message only within 24 hours of the person's last
  message (its customer-service window). A reply that would go out later (after
  an outage, a long hold) is not sent: it is logged, counted as the delivery
  failure ``window_closed``, and the log line tells the operator that only an
  approved template reaches a person outside the window. Twilio's own refusal
  for that reason (error 63016) is logged the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import cached_property, lru_cache
from typing import Any

from celery import Task

from channels.delivery import DeliveryPolicy, Outcome, PermanentDeliveryError
from channels.plaintext import whatsapp_text
from channels.sms.delivery import SmsDelivery, TwilioSender
from channels.sms.split import split_for_sms
from channels.whatsapp.state import WhatsAppState
from kernel.contract import Reply, delivery_task
from kernel.metrics import Metrics
from kernel.settings import get_settings
from workers.app import app

log = logging.getLogger(__name__)

# Twilio takes WhatsApp message bodies of up to 1,600 characters.
WHATSAPP_MAX_CHARS = 1600
# Twilio error 63016: a free-form message outside the 24-hour window.
WINDOW_CLOSED_CODES = frozenset({63016})
TEMPLATE_HINT = (
    "WhatsApp takes free-form replies only within 24 hours of the person's last message; "
    "after that only an approved message template, which GPT4People does not send: to reach "
    "people later, create one in Twilio Console > Messaging > Content Template Builder and "
    "send it yourself (README, Connect WhatsApp)"
)


class WhatsAppSender(TwilioSender):
    """Twilio's client, sending as the WhatsApp sender, in WhatsApp's formatting."""

    def origin(self, sender: str | None) -> dict[str, str]:
        """GPT4P_TWILIO_WHATSAPP_FROM, else the Messaging Service, else `sender` (the
        WhatsApp number the person wrote to)."""
        if self.settings.twilio_whatsapp_from:
            return {"from_": self.settings.twilio_whatsapp_from}
        if self.settings.twilio_messaging_service_sid:
            return {"messaging_service_sid": self.settings.twilio_messaging_service_sid}
        if not sender:
            raise PermanentDeliveryError("no sender: set GPT4P_TWILIO_WHATSAPP_FROM")
        return {"from_": sender}

    def parts_of(self, markdown: str, max_parts: int) -> list[str]:
        """A reply in WhatsApp's formatting (*bold*, _italic_), in numbered parts of 1,600
        characters."""
        return split_for_sms(whatsapp_text(markdown), max_parts, WHATSAPP_MAX_CHARS)


@lru_cache(maxsize=1)
def _sender() -> WhatsAppSender:
    return WhatsAppSender(get_settings())


class WhatsAppDelivery(SmsDelivery):
    """A reply's delivery on WhatsApp: as SMS's, within the person's 24-hour window."""

    channel = "whatsapp"

    @property
    def policy(self) -> DeliveryPolicy:
        """SMS's retries and backoff; WhatsApp's own hourly cap (GPT4P_WHATSAPP_MAX_PER_HOUR)."""
        return dataclasses.replace(super().policy, per_hour=self.settings.whatsapp_max_per_hour)

    @cached_property
    def state(self) -> WhatsAppState:
        """What the WhatsApp channel keeps in Redis: part claims, opt-outs, last messages."""
        return WhatsAppState(self.redis, self.settings)

    @property
    def sender(self) -> WhatsAppSender:
        """Twilio's client, sending as the WhatsApp sender."""
        return _sender()

    @property
    def max_parts(self) -> int:
        """Most messages one reply is sent in (GPT4P_WHATSAPP_MAX_PARTS)."""
        return self.settings.whatsapp_max_parts

    def send(self) -> Outcome:
        """Send the parts not sent yet, while the person's 24-hour window is open."""
        if self.state.window_left(self.reply.reply_to) <= 0:
            log.warning("reply %s to %s not sent: %s's window is closed. %s", self.reply.job_id,
                        self.recipient, self.recipient, TEMPLATE_HINT)  # fmt: skip
            Metrics(self.redis).count(
                "gpt4p_delivery_failures", {"channel": self.channel, "reason": "window_closed"}
            )
            return Outcome("window_closed", {"sent": 0})
        return super().send()

    def refused(self, error: PermanentDeliveryError) -> dict[str, Any]:
        """Twilio's "outside the window" is explained to the operator; the rest as SMS."""
        if error.code in WINDOW_CLOSED_CODES:
            log.warning("reply %s to %s refused by Twilio: the window is closed. %s",
                        self.reply.job_id, self.recipient, TEMPLATE_HINT)  # fmt: skip
        return super().refused(error)


@app.task(name=delivery_task("whatsapp"), bind=True, max_retries=None)
def deliver_whatsapp(self: Task, reply_data: dict[str, Any]) -> dict[str, Any]:
    """Send a reply on WhatsApp: split, each part once, transient failures retried."""
    return WhatsAppDelivery(self, Reply.model_validate(reply_data)).run()
