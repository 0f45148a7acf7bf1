"""What the Telegram channel remembers in Redis: the SMS channel's records, under its own
keys and with its own bounds.

A chat is to Telegram what a number is to SMS: updates seen (a replay is answered
once), a rate limit, a conversation, which reply parts were sent, and whether the
person blocked the bot (SMS's opt-out: Telegram answers 403 to a bot that was
blocked; their next message unblocks). Chat ids never appear in keys or logs in
clear (`chat_id`, a hash). The poller's place in the update stream is here too.
"""

from __future__ import annotations

from typing import ClassVar, cast

import redis

from channels.sms.state import SmsState, number_id
from kernel.settings import Settings

PREFIX = "gpt4p:telegram:"


def chat_key(chat: int | str) -> str:
    """How the inherited per-number records name a chat (hashed before any key is made)."""
    return f"telegram:{chat}"


def chat_id(chat: int | str) -> str:
    """A stable pseudonym of a chat, for keys and logs."""
    return number_id(chat_key(chat))


def _with_telegram_bounds(settings: Settings) -> Settings:
    """`settings` with the SMS records' bounds replaced by Telegram's own."""
    return settings.model_copy(update={
        "sms_replay_window_days": settings.telegram_replay_window_days,
        "sms_rate_limit": settings.telegram_rate_limit,
        "sms_rate_window": settings.telegram_rate_window,
        "sms_history_turns": settings.telegram_history_turns,
        "sms_history_chars": settings.telegram_history_chars,
        "sms_history_ttl": settings.telegram_history_ttl,
    })  # fmt: skip


# Telegram numbers updates anew after a week of silence (getUpdates' documentation).
OFFSET_TTL_S = 6 * 86_400


class TelegramState(SmsState):
    """The Telegram channel's records in Redis, per chat (one client, shared by threads).

    The inherited methods take the chat as their "number" (`chat_key`): keyed by its
    pseudonym, never in clear.
    """

    prefix: ClassVar[str] = PREFIX

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, _with_telegram_bounds(settings))

    def offset(self, bot: str) -> int:
        """The poller's place: the first update of `bot` not handled yet (0: none stored)."""
        return int(cast(bytes | None, self.redis.get(f"{PREFIX}offset:{bot}")) or 0)

    def advance(self, bot: str, offset: int) -> None:
        """Every update of `bot` before `offset` is handled: getUpdates starts there.

        Forgotten after a week without updates: Telegram then numbers the next update at
        random, possibly below our place, which would confirm it unseen."""
        self.redis.set(f"{PREFIX}offset:{bot}", offset, ex=OFFSET_TTL_S)
