"""The part of Telegram's `Update` object we read, parsed and bounded before any work.

Only ``message`` updates are handled (text, or a photo with its caption); every
other kind (an edit, a callback, a channel post...) parses with ``message`` None and
is acknowledged without work. Sizes are bounded here: Telegram's own limits
(4096 characters of text, 1024 of caption) with room, never trusted.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from channels.base import InvalidInboundError
from kernel.contract import MediaRef
from kernel.telegram_api import telegram_file_ref

MAX_UPDATE_BYTES = 256 * 1024  # a message's text, entities and a quoted message fit many times
MAX_TEXT_CHARS = 20_000


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Chat(_Lenient):
    """Where a message was written: a private chat with the bot, or a group."""

    id: int = Field(ge=-(10**15), le=10**15)


class Sender(_Lenient):
    """Who wrote it."""

    id: int = Field(ge=0, le=10**15)
    is_bot: bool = False


class PhotoSize(_Lenient):
    """One of the sizes Telegram keeps of a photo."""

    file_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,256}$")
    width: int = Field(ge=0, le=100_000)
    height: int = Field(ge=0, le=100_000)
    file_size: int | None = Field(None, ge=0)


class Message(_Lenient):
    """A message to the bot."""

    message_id: int = Field(ge=0, le=2**53)
    chat: Chat
    sender: Sender | None = Field(None, alias="from")
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    caption: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    photo: list[PhotoSize] = Field(default_factory=list, max_length=20)

    @field_validator("text", "caption")
    @classmethod
    def _printable(cls, text: str | None) -> str | None:
        # Control characters other than line breaks and tabs carry nothing a model can use.
        return None if text is None else "".join(c for c in text if c in "\n\t" or c.isprintable())

    @property
    def words(self) -> str:
        """What was written: the text, or a photo's caption."""
        return (self.text if self.text is not None else self.caption) or ""

    def media(self, max_bytes: int) -> list[MediaRef]:
        """The photo's largest size Telegram says is at most `max_bytes`, as the job's media."""
        fitting = [p for p in self.photo if p.file_size is None or p.file_size <= max_bytes]
        if not fitting:
            return []
        largest = max(fitting, key=lambda p: (p.width * p.height, p.file_size or 0))
        return [telegram_file_ref(largest.file_id)]


class Update(_Lenient):
    """One update: its id and, for the kind we handle, its message."""

    update_id: int = Field(ge=0, le=2**53)
    message: Message | None = None

    @property
    def source_id(self) -> str:
        """What identifies this message for good: update, chat and message ids (after a week
        of silence Telegram starts update ids afresh, at random)."""
        message = self.message
        where = f"{message.chat.id}:{message.message_id}" if message else "-"
        return f"{self.update_id}:{where}"


def parse_update(raw: bytes | str) -> Update:
    """The update in `raw` (JSON); `InvalidInboundError` naming the bad fields, never values."""
    try:
        return Update.model_validate_json(raw)
    except ValidationError as error:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "body" for e in error.errors()})
        raise InvalidInboundError(f"invalid update fields: {', '.join(fields[:5])}") from None
