"""Splitting a long answer into SMS parts people can read in order."""

from __future__ import annotations

import re
import unicodedata

# Twilio accepts message bodies up to 1,600 characters.
TWILIO_MAX_CHARS = 1600
TRUNCATED_MARKER = " … [reply truncated]"
_SENTENCE_END = re.compile(r"[.!?…。](?:[\"')\]]*)\s+|\n+")
_JOINERS = {"\u200d", "\u200c"}  # zero-width joiner / non-joiner glue emoji and scripts


def utf16_len(text: str) -> int:
    """Length as Twilio counts it: UTF-16 code units (an emoji outside the BMP counts 2)."""
    return len(text.encode("utf-16-le")) // 2


def _prefix_fitting(text: str, budget: int) -> int:
    """The number of code points of `text` whose UTF-16 length fits `budget`."""
    used = 0
    for index, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > budget:
            return index
    return len(text)


def _safe_cut(text: str, cut: int) -> int:
    """Move `cut` left until it splits no grapheme (combining marks, joiners, selectors)."""
    while 0 < cut < len(text) and (
        unicodedata.combining(text[cut])
        or text[cut] in _JOINERS
        or text[cut - 1] in _JOINERS
        or 0xFE00 <= ord(text[cut]) <= 0xFE0F
        or 0x1F3FB <= ord(text[cut]) <= 0x1F3FF  # skin-tone modifiers
    ):
        cut -= 1
    return cut


def _break_point(text: str, budget: int) -> int:
    """Where to end a part of at most `budget` units: a sentence end, else a space, else hard."""
    limit = _prefix_fitting(text, budget)
    if limit >= len(text):
        return len(text)
    window = text[: limit + 1]
    sentence_ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() <= limit]
    if sentence_ends and sentence_ends[-1] > limit // 2:
        return sentence_ends[-1]
    space = max(window.rfind(" "), window.rfind("\n"))
    if space > limit // 4:
        return space + 1
    return _safe_cut(text, limit) or limit  # one enormous "word": cut it, but not a character


def split_for_sms(text: str, max_parts: int = 3, limit: int = TWILIO_MAX_CHARS) -> list[str]:
    """Split `text` into at most `max_parts` numbered parts of at most `limit` UTF-16 units."""
    text = text.strip()
    if utf16_len(text) <= limit:
        return [text]
    budget = limit - len(" (99/99)")
    chunks: list[str] = []
    rest = text
    while rest:
        cut = _break_point(rest, budget)
        chunks.append(rest[:cut].strip())
        rest = rest[cut:].lstrip()
    chunks = [c for c in chunks if c]
    if len(chunks) > max_parts:
        kept = chunks[: max_parts - 1]
        last = chunks[max_parts - 1]
        room = budget - utf16_len(TRUNCATED_MARKER)
        cut = _break_point(last, room) if utf16_len(last) > room else len(last)
        kept.append(last[:cut].rstrip() + TRUNCATED_MARKER)
        chunks = kept
    total = len(chunks)
    if total == 1:
        return chunks
    return [f"({i}/{total}) {chunk}" for i, chunk in enumerate(chunks, start=1)]
