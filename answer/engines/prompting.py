"""Prompt text to tokens that fit the context window, shared by the llama.cpp engines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from answer.engines import PromptTooLongError
from answer.prompt import PromptText, build_prompt
from kernel.contract import ChatMessage
from kernel.settings import Settings

Tokenize = Callable[[str, bool, bool], list[int]]  # text, add_bos, special -> tokens

# An answer needs at least this much room, or the prompt is cut (or refused).
MIN_ANSWER_TOKENS = 16


class PromptFitter:
    """The model's chat template and tokenizer, cutting old turns to fit GPT4P_N_CTX."""

    def __init__(
        self,
        settings: Settings,
        chat_template: str | None,
        tokenize: Tokenize,
        token_text: Callable[[int], str],
        bos: int = -1,
        eos: int = -1,
    ) -> None:
        self._settings = settings
        self._tokenize = tokenize
        self.chat_template = chat_template
        self.bos_token = token_text(bos)
        self.eos_token = token_text(eos)

    def tokens(self, prompt: PromptText) -> list[int]:
        """The prompt's tokens, with one BOS token."""
        text = prompt.text
        # A template that writes the BOS token itself must not get a second one.
        add_bos = not (self.bos_token and text.startswith(self.bos_token))
        return self._tokenize(text, add_bos, prompt.templated)

    def fit(
        self, messages: Sequence[ChatMessage], wanted: int | None
    ) -> tuple[PromptText, list[int], int]:
        """Drop the oldest turns until the prompt and the answer fit the context window.

        `wanted`: the tokens the caller asked for (None: GPT4P_MAX_TOKENS, also the
        ceiling). Returns the prompt, its tokens and the tokens left for the answer."""
        n_ctx = self._settings.n_ctx
        max_tokens = min(wanted or self._settings.max_tokens, self._settings.max_tokens)
        turns = list(messages)
        while True:
            prompt = build_prompt(turns, self._settings.system_prompt, self.chat_template,
                                  self.bos_token, self.eos_token)  # fmt: skip
            tokens = self.tokens(prompt)
            room = n_ctx - len(tokens)
            if room >= min(max_tokens, MIN_ANSWER_TOKENS):
                return prompt, tokens, min(max_tokens, room)
            if len(turns) <= 1 or (len(turns) == 2 and turns[0].role == "system"):
                raise PromptTooLongError(
                    f"the message is {len(tokens)} tokens long; this model reads at most "
                    f"{n_ctx - MIN_ANSWER_TOKENS}"
                )
            first_dialogue = 1 if turns[0].role == "system" else 0
            del turns[first_dialogue]
