"""The unbatched llama.cpp engine: one job at a time per process (GPT4P_PARALLEL=1)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, cast

import llama_cpp
from llama_cpp import Llama, LlamaGrammar, StoppingCriteriaList

from answer.engines import Generation, TextSink, offloaded_layers
from answer.engines.batched import init_grammar
from answer.engines.prompting import PromptFitter
from answer.engines.vocabulary import special_tokens
from kernel.contract import ChatMessage, GenerationOptions
from kernel.model_files import model_label, resolve_model_path
from kernel.settings import Settings

log = logging.getLogger(__name__)


class LlamaEngine:
    """One GGUF model loaded into this process; generates one answer at a time."""

    name = "llama"

    def __init__(self, llm: Llama, settings: Settings, model_name: str) -> None:
        self._llm = llm
        self._settings = settings
        self._lock = threading.Lock()
        self.model_name = model_name
        vocab = llm._model.vocab
        template = llm.metadata.get("tokenizer.chat_template") or None
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        special = special_tokens(vocab, n_vocab, self._token_text, template)
        self._never_text = special.never_text
        self._fitter = PromptFitter(
            settings,
            template,
            lambda text, add_bos, special: llm.tokenize(text.encode("utf-8"), add_bos, special),
            self._token_text,
            llm.token_bos(),
            llm.token_eos(),
            special.markers,
        )
        self.chat_template = self._fitter.chat_template

    def _not_text_after(self, prompt_tokens: int) -> StoppingCriteriaList:
        """Stop once a token that is not text was generated. llama-cpp-python shows the
        tokens evaluated so far, not the one just sampled: this stops one token later, after
        a control token's empty text (a user-defined marker's text is a stop string)."""

        def after_prompt(tokens: Any, _: Any) -> bool:
            return len(tokens) > prompt_tokens and bool(self._never_text[int(tokens[-1])])

        return StoppingCriteriaList([after_prompt])

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    @classmethod
    def load(cls, settings: Settings, path: Path | None = None) -> LlamaEngine:
        """Load the configured GGUF (GPT4P_MODEL_PATH or the bundled default)."""
        path = path or resolve_model_path(settings)
        started = time.monotonic()
        gpu_layers = offloaded_layers(settings)
        llm = Llama(
            model_path=str(path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads or os.cpu_count() or 1,
            n_gpu_layers=gpu_layers,
            seed=settings.seed if settings.seed is not None else 0xFFFFFFFF,
            verbose=False,
        )
        log.info(
            "model loaded: %s in %.2fs (n_ctx=%d, gpu_layers=%d)",
            path.name, time.monotonic() - started, settings.n_ctx, gpu_layers,
        )  # fmt: skip
        return cls(llm, settings, model_label(settings))

    def generate(
        self,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:
        """Complete the conversation with llama.cpp, streaming text into `on_text`."""
        settings = self._settings
        with self._lock:
            prompt, tokens, max_tokens = self._fitter.fit(messages, options)
            if options.grammar is not None:
                # Parsed once here first, quietly: llama.cpp prints a grammar it refuses
                # (the caller's enum values and property names) to stderr.
                checked = init_grammar(self._llm._model.vocab, options.grammar)
                if checked is None:
                    raise ValueError("the grammar could not be parsed")
                llama_cpp.llama_sampler_free(checked)
            grammar = (LlamaGrammar.from_string(options.grammar, verbose=False)
                       if options.grammar is not None else None)  # fmt: skip
            # ignore_eos must not fight a grammar's end: the grammar decides where it ends.
            no_eos = options.ignore_eos and grammar is None
            stream = cast(
                Generator[dict[str, Any], None, None],
                self._llm.create_completion(
                    tokens,
                    max_tokens=max_tokens,
                    temperature=settings.temperature
                    if options.temperature is None
                    else options.temperature,
                    top_p=options.top_p if options.top_p is not None else 0.95,
                    # ignore_eos: no end token, no template stop strings (the caller's stay).
                    stop=[*([] if options.ignore_eos else prompt.stop), *options.stop],
                    logit_bias={self._llm.token_eos(): float("-inf")} if no_eos else None,
                    grammar=grammar,
                    seed=options.seed if options.seed is not None else settings.seed,
                    # A token that is not text (a model's markup) ends the answer unshown.
                    stopping_criteria=self._not_text_after(len(tokens)),
                    stream=True,
                ),
            )
            guard = None if options.grammar is not None or options.ignore_eos else prompt.guard
            text, emitted = "", 0
            finish: str | None = None
            for chunk in stream:
                choice = chunk["choices"][0]
                text += choice["text"]
                finish = choice.get("finish_reason") or finish
                if guard is not None and (at := guard.cut(text, emitted)) is not None:
                    text, finish = text[:at], "stop"
                    stream.close()  # ends the generation here
                    break
                held = guard.hold(text, emitted) if guard is not None and not finish else 0
                if on_text is not None and len(text) - held > emitted:
                    on_text(text[emitted : len(text) - held])
                emitted = len(text) - held
            if on_text is not None and len(text) > emitted:
                on_text(text[emitted:])
            completion_tokens = len(self._llm.tokenize(text.encode("utf-8"), add_bos=False))
        return Generation(
            text=text,
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=len(tokens),
            completion_tokens=completion_tokens,
        )
