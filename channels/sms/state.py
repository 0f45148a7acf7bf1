"""What the SMS channel remembers in Redis: seen messages, opt-outs, rate limits,
conversations, and which reply parts were already sent.

Phone numbers never appear in keys or logs in clear: they are hashed
(`number_id`), so a Redis dump or a log line does not list who texted.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import ClassVar, Literal, cast

import redis

from kernel.contract import ChatMessage
from kernel.ratelimit import RateVerdict, SenderRateLimit
from kernel.settings import Settings

PREFIX = "gpt4p:sms:"
DAY_S = 24 * 3600
PART_SENT_TTL_S = 7 * 24 * 3600

# Whether ARGV[1] (a MessageSid) is in one of the day sets KEYS[2..] (today first), or
# has a key of its own KEYS[1] (how MessageSids were kept for 7 days before the day
# sets); if not, add it to today's set. Returns -1 for a new MessageSid, else how
# many days ago it was first seen.
_CLAIM_SID = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do
  if redis.call('SISMEMBER', KEYS[i], ARGV[1]) == 1 then return i - 2 end
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return -1
"""

PartState = Literal["claimed", "sent", "in_flight", "unknown"]


def _compact(message_sid: str) -> bytes:
    """The MessageSid in half the bytes: its two letters, then its hex digits as bytes."""
    try:
        return message_sid[:2].encode() + bytes.fromhex(message_sid[2:])
    except ValueError:  # not Twilio's shape (the webhook checks it): kept as it is
        return message_sid.encode()


def number_id(number: str) -> str:
    """A stable pseudonym of a phone number, for keys and logs."""
    return "n" + hashlib.sha256(number.encode("utf-8")).hexdigest()[:16]


class SmsState:
    """The SMS channel's records in Redis (one client, shared by threads)."""

    # The channel's own keys: a channel built on this one (WhatsApp) shares nothing with SMS.
    prefix: ClassVar[str] = PREFIX

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings

    def claim_message(self, message_sid: str) -> int | None:
        """None the first time `message_sid` is seen; else how many days ago it was.

        Twilio signs no timestamp, so a webhook copied by someone in between stays
        valid: the only defence is remembering every MessageSid for as long as a
        replay should be refused (GPT4P_SMS_REPLAY_WINDOW_DAYS), far longer than
        Twilio's own retries (minutes). One set per day, stored compactly and
        expiring whole, keeps that cheap: about 70 bytes a message (a key per message
        took twice that).
        """
        days = self.settings.sms_replay_window_days
        today = int(time.time()) // DAY_S
        day_sets = [f"{self.prefix}sids:{day}" for day in range(today, today - days - 1, -1)]
        keys = [f"{self.prefix}seen:{message_sid}", *day_sets]
        found = cast(int, self.redis.eval(_CLAIM_SID, len(keys), *keys, _compact(message_sid),
                                          (days + 1) * DAY_S))  # fmt: skip
        return None if found < 0 else found

    # --- opt-out ---------------------------------------------------------------------
    def opt_out(self, number: str) -> None:
        """Send nothing more to `number` until it opts in again."""
        self.redis.sadd(f"{self.prefix}optout", number_id(number))

    def opt_in(self, number: str) -> None:
        """Let `number` receive answers again."""
        self.redis.srem(f"{self.prefix}optout", number_id(number))

    def is_opted_out(self, number: str) -> bool:
        """Whether `number` asked to receive nothing."""
        return bool(self.redis.sismember(f"{self.prefix}optout", number_id(number)))

    # --- rate limit ------------------------------------------------------------------
    def rate_verdict(self, number: str) -> RateVerdict:
        """Count one message: within the limit, the first over it (notify), or later (silent)."""
        limit = SenderRateLimit(self.redis, f"{self.prefix}rate:", self.settings.sms_rate_limit,
                                self.settings.sms_rate_window)  # fmt: skip
        return limit.verdict(number_id(number))

    # --- conversation ----------------------------------------------------------------
    def _history_key(self, number: str) -> str:
        return f"{self.prefix}history:{number_id(number)}"

    def history(self, number: str) -> list[ChatMessage]:
        """The latest turns with `number`, within the configured turn and character bounds."""
        settings = self.settings
        if settings.sms_history_turns == 0:
            return []
        raw = cast(list[bytes], self.redis.lrange(self._history_key(number), 0, -1))
        turns = [ChatMessage.model_validate(json.loads(item)) for item in raw]
        turns = turns[-2 * settings.sms_history_turns :]
        while turns and sum(len(t.content) for t in turns) > settings.sms_history_chars:
            turns = turns[1:]
        while turns and turns[0].role != "user":
            turns = turns[1:]
        return turns

    def remember(self, number: str, message: ChatMessage) -> None:
        """Append a turn to `number`'s conversation and restart its idle timer."""
        key = self._history_key(number)
        pipe = self.redis.pipeline()
        pipe.rpush(key, message.model_dump_json())
        pipe.ltrim(key, -4 * max(1, self.settings.sms_history_turns), -1)
        pipe.expire(key, self.settings.sms_history_ttl)
        pipe.execute()

    def forget(self, number: str) -> None:
        """Clear `number`'s conversation (RESET)."""
        self.redis.delete(self._history_key(number))

    # --- sent parts ------------------------------------------------------------------
    def _part_key(self, job_id: str, index: int) -> str:
        return f"{self.prefix}part:{job_id}:{index}"

    def claim_part(self, job_id: str, index: int, stale_after: float) -> tuple[PartState, float]:
        """Mark part `index` as being sent now, unless it was sent or is being sent.

        Returns the state and, for a part another delivery started, when it started:
        "in_flight" while that may still be going on, "unknown" once it is older
        than `stale_after` seconds (that delivery died or timed out: Twilio may or
        may not have the message, and must be asked).
        """
        key, now = self._part_key(job_id, index), time.time()
        if self.redis.set(key, f"sending:{now}", nx=True, ex=PART_SENT_TTL_S):
            return "claimed", now
        value = (cast(bytes | None, self.redis.get(key)) or b"").decode()
        if not value.startswith("sending:"):
            return ("sent", now) if value else self.claim_part(job_id, index, stale_after)
        started = float(value.split(":", 1)[1])
        return ("unknown" if now - started > stale_after else "in_flight"), started

    def reclaim_part(self, job_id: str, index: int) -> None:
        """Start sending part `index` again (Twilio was asked and has no such message)."""
        self.redis.set(self._part_key(job_id, index), f"sending:{time.time()}", ex=PART_SENT_TTL_S)

    def record_part(self, job_id: str, index: int, message_sid: str) -> None:
        """Part `index` was accepted by Twilio as `message_sid`: never send it again."""
        self.redis.set(self._part_key(job_id, index), message_sid, ex=PART_SENT_TTL_S)

    def release_part(self, job_id: str, index: int) -> None:
        """The send failed: let a retry send part `index` again."""
        self.redis.delete(self._part_key(job_id, index))
