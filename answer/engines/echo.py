"""The `echo` engine: answers with the prompt at once, for wiring tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from answer.engines import Generation, TextDelta, TextSink
from kernel.contract import ChatMessage, GenerationOptions, TokenLogprob, TopLogprob


class EchoEngine:
    """Replies with the latest message (the user's, a tool's, or the start of the answer to
    continue), cut to `max_tokens` words; with logprobs, every word is certain (logprob 0).
    Grammars are ignored."""

    name = "echo"
    model_name = "echo"

    def generate(
        self,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:
        """Return the prompt itself; whitespace-separated words count as tokens."""
        prompt_words = sum(len(m.content.split()) for m in messages)
        words = messages[-1].content.split(" ")
        limit = options.max_tokens or len(words)
        text = " ".join(words[:limit])
        logprobs = _certain(words[:limit], options.top_logprobs) if options.logprobs else None
        if on_text is not None and text:
            on_text(TextDelta(text, logprobs) if logprobs is not None else text)
        return Generation(
            text=text,
            finish_reason="length" if len(words) > limit else "stop",
            prompt_tokens=prompt_words,
            completion_tokens=min(len(words), limit),
            logprobs=logprobs,
        )


def _certain(words: list[str], top: int) -> list[TokenLogprob]:
    """Each word (with the space before it) as a token of log probability 0."""
    pieces = [word if i == 0 else f" {word}" for i, word in enumerate(words)]
    return [
        TokenLogprob(token=piece, logprob=0.0, bytes=list(piece.encode()),
                     top_logprobs=[TopLogprob(token=piece, logprob=0.0,
                                              bytes=list(piece.encode()))][:top])
        for piece in pieces
    ]  # fmt: skip
