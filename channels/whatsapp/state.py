"""What the WhatsApp channel remembers in Redis: the SMS channel's records (seen
messages, opt-outs, rate limits, conversations, sent parts) under keys of its own,
and when each person last wrote, which opens WhatsApp's 24-hour window.

A WhatsApp sender (``whatsapp:+E164``) and an SMS number never share a record,
even for the same phone: the prefixes differ, and so do the pseudonyms
(`number_id` of the whole address).
"""

from __future__ import annotations

import time
from typing import cast

from channels.sms.state import SmsState, number_id

# WhatsApp's customer-service window: free-form messages may be sent to a person for
# 24 hours after their last message; later only an approved template may.
WINDOW_S = 24 * 3600


class WhatsAppState(SmsState):
    """The WhatsApp channel's records in Redis (one client, shared by threads)."""

    prefix = "gpt4p:whatsapp:"

    def _inbound_key(self, sender: str) -> str:
        return f"{self.prefix}inbound:{number_id(sender)}"

    def note_inbound(self, sender: str, at: float | None = None) -> None:
        """`sender` wrote at `at` (None: now): free-form replies may reach them for 24 hours
        from then. A window already closed is not opened."""
        when = time.time() if at is None else at
        left = int(WINDOW_S - (time.time() - when))
        if left > 0 and self.window_left(sender) < left:  # never shortens a later window
            self.redis.set(self._inbound_key(sender), repr(when), ex=left)

    def window_left(self, sender: str) -> float:
        """Seconds left in which a free-form reply may be sent to `sender` (0: closed)."""
        raw = cast(bytes | None, self.redis.get(self._inbound_key(sender)))
        if raw is None:
            return 0.0
        return max(0.0, float(raw) + WINDOW_S - time.time())
