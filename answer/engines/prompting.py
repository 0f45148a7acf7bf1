"""Prompt text to tokens that fit the context window, shared by the llama.cpp engines
and by the token counting of the HTTP channel (`answer.engines.tokenizer`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from answer.engines import PromptTooLongError
from answer.prompt import PromptText, build_prompt, last_turn
from kernel.contract import ChatMessage, GenerationOptions
from kernel.settings import Settings

Tokenize = Callable[[str, bool, bool], list[int]]  # text, add_bos, special -> tokens

# An answer needs at least this much room, or the prompt is cut (or refused).
MIN_ANSWER_TOKENS = 16


def answer_tokens(options: GenerationOptions, settings: Settings) -> int:
    """The most tokens an answer may take: what the caller asked, at most GPT4P_MAX_TOKENS."""
    return min(options.max_tokens or settings.max_tokens, settings.max_tokens)


def prompt_limit(options: GenerationOptions, settings: Settings) -> int:
    """The most prompt tokens that fit: the context less the least room an answer needs."""
    return settings.n_ctx - min(answer_tokens(options, settings), MIN_ANSWER_TOKENS)


def too_long(tokens: int, limit: int) -> PromptTooLongError:
    """The error for a prompt that cannot fit, with the numbers."""
    return PromptTooLongError(f"the prompt is {tokens} tokens, the context holds {limit}")


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
        markers: Sequence[str] = (),
    ) -> None:
        self._settings = settings
        self._tokenize = tokenize
        self.chat_template = chat_template
        self.bos_token = token_text(bos)
        self.eos_token = token_text(eos)
        self._markers = tuple(markers)  # the model's special tokens, spelled out: never text

    def render(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> PromptText:
        """The prompt text exactly as the engines send it, with the model's markers as stops."""
        prompt = build_prompt(messages, self._settings.system_prompt, self.chat_template,
                              self.bos_token, self.eos_token, raw=options.raw_prompt)  # fmt: skip
        extra = tuple(m for m in self._markers if m not in prompt.stop)
        return replace(prompt, stop=prompt.stop + extra) if extra else prompt

    def tokens(self, prompt: PromptText) -> list[int]:
        """The prompt's tokens, with one BOS token."""
        text = prompt.text
        # A template that writes the BOS token itself must not get a second one.
        add_bos = not (self.bos_token and text.startswith(self.bos_token))
        return self._tokenize(text, add_bos, prompt.templated)

    def count_last_turn(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> int:
        """The tokens of the least prompt the engine would send: the system prompt and the
        last turn (the whole text of a raw prompt)."""
        turns = messages[-1:] if options.raw_prompt else last_turn(messages)
        return len(self.tokens(self.render(turns, options)))

    def fit(
        self, messages: Sequence[ChatMessage], options: GenerationOptions
    ) -> tuple[PromptText, list[int], int]:
        """Drop the oldest turns until the prompt and the answer fit the context window.

        Returns the prompt, its tokens and the tokens left for the answer (at most
        `answer_tokens`). Raises `PromptTooLongError` when even the last turn cannot fit."""
        n_ctx = self._settings.n_ctx
        max_tokens = answer_tokens(options, self._settings)
        limit = prompt_limit(options, self._settings)
        turns = list(messages[-1:] if options.raw_prompt else messages)
        least = len(messages[-1:] if options.raw_prompt else last_turn(messages))
        while True:
            prompt = self.render(turns, options)
            tokens = self.tokens(prompt)
            if len(tokens) <= limit:
                return prompt, tokens, min(max_tokens, n_ctx - len(tokens))
            if len(turns) <= least:
                raise too_long(len(tokens), limit)
            first_dialogue = 1 if turns[0].role == "system" else 0
            del turns[first_dialogue]
