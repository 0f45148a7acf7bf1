"""Counting a prompt's tokens without loading the model's weights, for callers that must
refuse a prompt before queueing it (the HTTP API's ``context_length_exceeded``).

The vocabulary is loaded once per process (llama.cpp's ``vocab_only``: metadata and
tokenizer, no tensors) and the prompt is rendered by the engines' own `PromptFitter`,
so the count is the one the engine will find.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from answer.engines.prompting import PromptFitter, prompt_limit
from kernel.contract import ChatMessage, GenerationOptions
from kernel.model_files import ModelNotFoundError, resolve_model_path
from kernel.settings import Settings

_lock = threading.Lock()
_vocabularies: dict[Path, _Vocabulary] = {}


class _Vocabulary:
    """A GGUF's tokenizer and chat template, loaded without its weights."""

    def __init__(self, path: Path) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = LlamaModel(path_model=str(path), params=params, verbose=False)
        self._lock = threading.Lock()
        self.chat_template: str | None = self._model.metadata().get("tokenizer.chat_template")
        self.bos, self.eos = self._model.token_bos(), self._model.token_eos()

    def tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        with self._lock:
            return list(self._model.tokenize(text.encode("utf-8"), add_bos, special))

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        with self._lock:
            piece: Any = self._model.token_to_piece(token, special=True)
        return bytes(piece).decode("utf-8", errors="ignore")

    def fitter(self, settings: Settings) -> PromptFitter:
        return PromptFitter(settings, self.chat_template or None, self.tokenize,
                            self.token_text, self.bos, self.eos)  # fmt: skip


def _vocabulary(settings: Settings) -> _Vocabulary | None:
    """This host's copy of the configured model's vocabulary, or None without the model."""
    if settings.engine != "llama":
        return None  # the echo and scripted engines have no tokens to count
    try:
        path = resolve_model_path(settings)
    except ModelNotFoundError:
        return None
    if not path.is_file():
        return None
    with _lock:
        vocabulary = _vocabularies.get(path)
        if vocabulary is None:
            vocabulary = _vocabularies[path] = _Vocabulary(path)
        return vocabulary


def prompt_tokens(
    messages: Sequence[ChatMessage], options: GenerationOptions, settings: Settings
) -> int | None:
    """The tokens of the least prompt the engine would send for `messages`: the system
    prompt and the last turn (older turns are dropped to fit), counted with the model's own
    vocabulary; None when this host has no model file (or the engine is echo or scripted).

    A count above `context_limit` is a prompt the engine refuses (`PromptTooLongError`)."""
    vocabulary = _vocabulary(settings)
    if vocabulary is None:
        return None
    return vocabulary.fitter(settings).count_last_turn(messages, options)


def context_limit(options: GenerationOptions, settings: Settings) -> int:
    """The most prompt tokens that fit: GPT4P_N_CTX less the least room the engine keeps
    for an answer."""
    return prompt_limit(options, settings)
