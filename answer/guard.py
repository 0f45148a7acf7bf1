"""Where a generated answer stops being an answer.

A small model often goes on past its answer: it writes the next speaker's label
("User: ...") as if the conversation continued, or recites the instruction it was
given ("1. You are a GPT4People, a helpful assistant..."). What follows is not
meant for the person, so the answer is cut at the start of that line or sentence.

The engines ask two questions while text is generated: where to cut (`cut`), and how
much of the end to hold back because it could still turn into such a start
(`hold`), as they do for stop strings. Only text not yet handed over is examined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Speaker labels a model writes when it invents the next turn (the transcript's own,
# and the usual ones of chat datasets).
LABELS = ("user", "assistant", "human")
# Words that a recited instruction drops or adds without changing it.
_FILLER = frozenset({"a", "an", "the"})
# Leading list markers, heading and quote marks, quotes and spaces of a line.
_MARKER = re.compile(r"[ \t]*(?:\d{1,3}[.)]|[-*•#>]+)?[ \t\"'*_]*")
_WORD = re.compile(r"[a-z0-9]+")
_LABEL = re.compile(r"(" + "|".join(LABELS) + r")[ \t]*:", re.IGNORECASE)
# Where a line or a sentence starts: the answer's start, after a newline, after ". ".
_START = re.compile(r"(?:(?<=\n)|(?<=[.!?][ \t]))")
# An echo is recognised from this many words of an instruction's sentence.
ECHO_WORDS = 4
# How far past a start an echo or a label can reach (characters).
_REACH = 160


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _FILLER]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def _could_become(words: list[str], echo: tuple[str, ...], whole: bool) -> bool:
    """Whether a line that so far reads `words` may still start with `echo`."""
    if not words:
        return True
    done, last = words[:-1], words[-1]
    if list(echo[: len(done)]) != done:
        return False
    return echo[len(done)] == last if whole else echo[len(done)].startswith(last)


@dataclass(frozen=True)
class AnswerGuard:
    """The starts that end an answer: speaker labels, and the instruction's sentences."""

    echoes: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def for_instruction(cls, instruction: str) -> AnswerGuard:
        """A guard against reciting `instruction` (the system prompt) and inventing turns."""
        echoes = []
        for sentence in _sentences(instruction):
            words = _words(sentence)
            if len(words) >= 3:  # shorter is too common a start to mean anything
                echoes.append(tuple(words[:ECHO_WORDS]))
        return cls(tuple(dict.fromkeys(echoes)))

    def _starts(self, text: str, begin: int) -> list[int]:
        starts = [0] if begin == 0 else []
        starts.extend(m.start() for m in _START.finditer(text, max(begin, 1)))
        return starts

    def _verdict(self, text: str, start: int) -> str:
        """ "cut" if an unwanted start begins at `start`, "hold" if it still could, else ""."""
        rest = text[start : start + _REACH]
        line, newline, _ = rest.partition("\n")
        finished = bool(newline) or len(rest) == _REACH  # no more words will join this line
        body = line[_MARKER.match(line).end() :]  # type: ignore[union-attr]
        if start > 0 and text[start - 1] == "\n":  # a label only counts at a line's start
            if _LABEL.match(body):
                return "cut"
            head = body.rstrip(" \t").lower()
            if not finished and any(f"{label}:".startswith(head) for label in LABELS):
                return "hold"
        words = _words(body)
        whole = finished or (bool(body) and not body[-1].isalnum())  # the last word is whole
        verdict = ""
        for echo in self.echoes:
            n = len(echo)
            if tuple(words[:n]) == echo and (len(words) > n or whole):
                return "cut"
            if not finished and len(words) <= n and _could_become(words, echo, whole):
                verdict = "hold"
        return verdict

    def cut(self, text: str, begin: int = 0) -> int | None:
        """Where the answer must end (a start at or after `begin`), or None."""
        for start in self._starts(text, begin):
            if self._verdict(text, start) == "cut":
                return start
        return None

    def hold(self, text: str, begin: int = 0) -> int:
        """How many trailing characters (after `begin`) could still become a cut."""
        for start in self._starts(text, begin):
            if self._verdict(text, start) == "hold":
                return len(text) - start
        return 0
