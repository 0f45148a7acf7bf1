"""The WhatsApp channel: Twilio's WhatsApp webhook in, a job (or a keyword answer) out.

Twilio posts a WhatsApp message as it posts an SMS, with ``whatsapp:+E164``
addresses and a few fields of WhatsApp's own. ``POST /whatsapp`` is the SMS
webhook (`channels.sms.webhook.twilio_webhook`: signature for the URL Twilio
called, MessageSid dedup and replay window, STOP/START/HELP/RESET, rate
limits, the spool during a Redis outage) with the WhatsApp channel's records
and texts; a WhatsApp message posted to ``/sms`` is handed here too. Every
message also notes when the person last wrote, for the 24-hour window
(`channels.whatsapp.delivery`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from pydantic import Field

from channels.sms.webhook import SmsChannel, SmsInbound, twilio_webhook
from channels.whatsapp.state import WhatsAppState

# Twilio writes a WhatsApp address with the channel's prefix: whatsapp:+14155238886.
WHATSAPP_ADDRESS = r"^whatsapp:\+[1-9][0-9]{3,16}$"

HELP_TEXT = (
    "GPT4People: send any question and an AI model answers here. "
    "RESET starts a new conversation. STOP ends all messages, START resumes them."
)
WHATSAPP_BREVITY = " You are answering on WhatsApp: keep the reply short, a few sentences."


class WhatsAppInbound(SmsInbound):
    """The fields of Twilio's WhatsApp webhook that we use (or bound and ignore)."""

    sender: str = Field(alias="From", pattern=WHATSAPP_ADDRESS)
    recipient: str = Field(alias="To", pattern=WHATSAPP_ADDRESS)
    # The person's WhatsApp profile name and id: checked, never logged or kept.
    profile_name: str = Field("", alias="ProfileName", max_length=256)
    wa_id: str = Field("", alias="WaId", pattern=r"^[0-9]{0,20}$")


class WhatsAppChannel(SmsChannel):
    """The SMS channel's handling of a message, with WhatsApp's records, texts and window."""

    name = "whatsapp"
    label = "WhatsApp"
    inbound_type = WhatsAppInbound
    state_type = WhatsAppState
    brevity = WHATSAPP_BREVITY
    help_text = HELP_TEXT
    state: WhatsAppState

    @property
    def max_tokens(self) -> int:
        """The answer length asked of the model (GPT4P_WHATSAPP_MAX_TOKENS)."""
        return self.settings.whatsapp_max_tokens

    def arrived(self, inbound: SmsInbound, at: float | None = None) -> None:
        """The person wrote: their 24-hour window opens (again) from when the message came
        (a message spooled during an outage came earlier than it is handled)."""
        self.state.note_inbound(inbound.sender, at)


router = APIRouter()


@router.post("/whatsapp", response_model=None)
async def whatsapp_webhook(
    request: Request,
    x_twilio_signature: Annotated[str | None, Header()] = None,
) -> Response:
    """Twilio's incoming-message webhook of a WhatsApp sender."""
    return await twilio_webhook(request, x_twilio_signature, WhatsAppChannel)
