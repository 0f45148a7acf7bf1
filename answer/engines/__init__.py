"""Inference engines: the `Engine` protocol and the factory that picks one by setting.

llama.cpp is imported only by `answer.engines.llama`, and only when the
``llama`` engine is created, so that channels, helpers and the CLI stay light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from kernel.contract import ChatMessage, GenerationOptions, TokenLogprob
from kernel.settings import Settings

TextSink = Callable[[str], None]


class TextDelta(str):
    """Streamed text that carries the logprobs of its tokens (when the job asked for them):
    a `str` to every sink, so sinks that only want the text need not know."""

    logprobs: tuple[TokenLogprob, ...]

    def __new__(cls, text: str, logprobs: Sequence[TokenLogprob] = ()) -> TextDelta:
        delta = super().__new__(cls, text)
        delta.logprobs = tuple(logprobs)
        return delta


def delta_logprobs(text: str) -> list[TokenLogprob]:
    """The logprobs a streamed piece of text carries (none for a plain `str`)."""
    return list(text.logprobs) if isinstance(text, TextDelta) else []


class PromptTooLongError(ValueError):
    """The conversation does not fit the model's context window, even cut to its last turn."""


class GrammarTooSlowError(ValueError):
    """The job's grammar (its JSON schema, its tools) costs the sampler too much time per token:
    the engine ended the job so that the others sharing its batch go on."""


class GenerationTimeLimitError(RuntimeError):
    """The generation ran past its time limit (GPT4P_TASK_SOFT_TIME_LIMIT); the text
    produced so far has already gone to the caller's `on_text`."""


@dataclass(frozen=True)
class Generation:
    """What an engine produced for one prompt."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    # With options.logprobs: each generated token's, in OpenAI's shape (else None).
    logprobs: list[TokenLogprob] | None = None


class Engine(Protocol):
    """Something that answers a conversation; one instance per worker process."""

    name: str
    model_name: str

    def generate(
        self,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        on_text: TextSink | None = None,
    ) -> Generation:
        """Complete the conversation; `on_text` receives the text as it is produced."""
        ...


def create_engine(settings: Settings) -> Engine:
    """The engine named by GPT4P_ENGINE, loaded and ready."""
    if settings.engine == "echo":
        from answer.engines.echo import EchoEngine

        return EchoEngine()
    if settings.engine == "scripted":
        from answer.engines.scripted import ScriptedEngine

        return ScriptedEngine()
    if batches(settings):
        from answer.engines.batched import BatchedLlamaEngine

        return BatchedLlamaEngine.load(settings)
    from answer.engines.llama import LlamaEngine

    return LlamaEngine.load(settings)


def batches(settings: Settings) -> bool:
    """Whether workers with these settings run the batched engine (a threads pool)."""
    return settings.engine == "llama" and settings.parallel > 1


def batch_slots(settings: Settings) -> int:
    """The slots of a batched engine: GPT4P_PARALLEL for any job, and GPT4P_PRIORITY_SLOTS
    more that the worker fills only from its fast lanes (interactive jobs)."""
    return settings.parallel + settings.priority_slots


def offloaded_layers(settings: Settings) -> int:
    """Layers to put on the GPU: GPT4P_N_GPU_LAYERS, else all on a GPU worker, none on CPU."""
    if settings.n_gpu_layers is not None:
        return settings.n_gpu_layers
    return -1 if settings.gpu is not None else 0
