"""Which tokens of a model are never text for a person, read from its vocabulary.

Control tokens (end of turn, start of turn, padding) and unused ones are the
model's markup; so are user-defined markers such as Gemma's ``<start_of_image>``
(its other user-defined tokens, runs of spaces and HTML tags, are text). A model
that generates one has left its answer: the engines end the answer there, and
the markers' texts are also stop strings in case a model spells one out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp
import numpy as np

# A user-defined token that is a marker, not text: <start_of_image>, <|tool|>, [multimodal].
_MARKER = re.compile(r"^(<[^<>\s]*[_|][^<>\s]*>|\[\w+\])$")
# The texts of this many markers at most become stop strings (each costs a search per token).
MAX_MARKER_STOPS = 32


@dataclass(frozen=True)
class SpecialTokens:
    """The tokens that end an answer and the marker texts that are stop strings."""

    never_text: np.ndarray  # bool per token id: markup, and the end-of-generation tokens
    markers: tuple[str, ...]


def special_tokens(
    vocab: object, n_vocab: int, text_of: Callable[[int], str], chat_template: str | None = None
) -> SpecialTokens:
    """Read the vocabulary's attributes once (at load).

    The stop strings are the texts a model could spell out by mistake: its end tokens,
    the control tokens its chat template writes, and user-defined markers. Other control
    tokens (SmolLM2's ``<filename>``) stay text when spelled: "tar -xzf <filename>".
    """
    never_text = np.zeros(n_vocab, dtype=bool)
    markers: list[str] = []
    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    unused = llama_cpp.LLAMA_TOKEN_ATTR_UNUSED
    user_defined = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    for token in range(n_vocab):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        ends = llama_cpp.llama_vocab_is_eog(vocab, token)
        if ends or attr & unused or attr & control:
            never_text[token] = True
            if attr & unused:
                continue
            text = text_of(token)
            if len(text) > 2 and (ends or (chat_template and text in chat_template)):
                markers.append(text)
        elif attr & user_defined and _MARKER.match(text := text_of(token)):
            never_text[token] = True
            markers.append(text)
    # The shortest first: a model that spells one out is most likely to spell those.
    stops = tuple(sorted(dict.fromkeys(markers), key=len))
    return SpecialTokens(never_text, stops[:MAX_MARKER_STOPS])
