"""Where a generated answer stops being an answer.

A small model often goes on past its answer: it recites the instruction it was
given ("1. You are a GPT4People, a helpful assistant..."), or, prompted with a
transcript, writes the next speaker's label ("Human: ...") as if the conversation
went on. What follows is not meant for the person, so the answer is cut at the
start of that line.

Only line starts count, outside code fences: a label is one at the very start
of a line (``- Human: 46`` in a list, ``user: User`` in code are text), and an
echo is a whole sentence of the operator's instruction (its first `ECHO_WORDS`
words when longer), after an optional list marker. A caller's own system message
is not guarded: its sentences are what a retrieval prompt wants quoted.

The engines ask two questions while text is generated: where to cut (`cut`), and
how much of the end to hold back because it could still turn into such a start
(`hold`), as they do for stop strings. Only text not yet handed over is examined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Speaker labels a base model writes when it invents the next turn of a transcript.
LABELS = ("user", "assistant", "human")
# Words that a recited instruction drops or adds without changing it.
_FILLER = frozenset({"a", "an", "the"})
# A line's leading list marker, heading or quote mark, quotes and spaces.
_MARKER = re.compile(r"[ \t]*(?:\d{1,3}[.)]|[-*•#>]+)?[ \t\"'*_]*")
# A line that so far is only the start of a numbered marker ("1", "12").
_NUMBER_SO_FAR = re.compile(r"[ \t]*\d{1,3}")
_WORD = re.compile(r"[^\W_]+")  # words in any script
_LABEL = re.compile(r"(" + "|".join(LABELS) + r")[ \t]*:", re.IGNORECASE)
_LINE_START = re.compile(r"(?<=\n)")
FENCE = "```"
# An echo is recognised from a whole sentence, or this many of its words.
ECHO_WORDS = 6
# How far past a start an echo or a label can reach (characters).
_REACH = 200


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
    """The line starts that end an answer: the instruction's sentences and, for a
    transcript, speaker labels."""

    echoes: tuple[tuple[str, ...], ...] = ()
    labels: bool = False

    @classmethod
    def for_instruction(cls, instruction: str, labels: bool = False) -> AnswerGuard:
        """A guard against reciting `instruction` (the operator's system prompt) and, with
        `labels`, against inventing the next turn of a transcript."""
        echoes = []
        for sentence in _sentences(instruction):
            words = _words(sentence)
            if len(words) >= 3:  # shorter is too common a start to mean anything
                echoes.append(tuple(words[:ECHO_WORDS]))
        return cls(tuple(dict.fromkeys(echoes)), labels)

    def _verdict(self, text: str, start: int) -> str:
        """ "cut" if an unwanted line begins at `start`, "hold" if it still could, else ""."""
        if text.count(FENCE, 0, start) % 2:
            return ""  # inside a code block: anything goes
        rest = text[start : start + _REACH]
        line, newline, _ = rest.partition("\n")
        finished = bool(newline) or len(rest) == _REACH  # no more words will join this line
        if self.labels and start > 0:
            if _LABEL.match(line):
                return "cut"
            head = line.rstrip(" \t").lower()
            if not finished and any(f"{label}:".startswith(head) for label in LABELS):
                return "hold"
        if not self.echoes:
            return ""
        if not finished and _NUMBER_SO_FAR.fullmatch(line):
            return "hold"  # "1" may become "1. You are ..."
        body = line[_MARKER.match(line).end() :]  # type: ignore[union-attr]
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

    def _starts(self, text: str, begin: int) -> list[int]:
        starts = [0] if begin == 0 else []
        starts.extend(m.start() for m in _LINE_START.finditer(text, max(begin, 1)))
        return starts

    def cut(self, text: str, begin: int = 0) -> int | None:
        """Where the answer must end (a line start at or after `begin`), or None."""
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
