"""The `echo` engine: answers with the prompt at once, for wiring tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from answer.engines import Generation, TextSink
from kernel.contract import ChatMessage, GenerationOptions


class EchoEngine:
    """Replies with the latest user message, cut to `max_tokens` words."""

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
        if on_text is not None and text:
            on_text(text)
        return Generation(
            text=text,
            finish_reason="length" if len(words) > limit else "stop",
            prompt_tokens=prompt_words,
            completion_tokens=min(len(words), limit),
        )
