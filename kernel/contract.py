"""The contract between channels, the core and helpers: `Job`, `Reply`, task and queue names.

Light on purpose: channels and helpers import this module without importing
Celery's worker side or llama.cpp. Everything here crosses Redis as JSON.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Queue names are public surface (README, "Operations"): operators route and scale by them.
INFERENCE_QUEUE = "inference"
INFERENCE_TASK = "gpt4people.inference"


# How soon a job is answered. "interactive": a person is waiting (SMS, chat, `ask`); it
# goes to its queue's fast lane and pauses the others while it generates. "normal": the
# default of the HTTP API and email. "bulk": whatever can wait (a batch job, a sender over
# its fair share). Order matters: earlier is sooner.
Priority = Literal["interactive", "normal", "bulk"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "normal", "bulk")
# Celery message priorities within a queue (kombu's Redis transport: 0 is served first).
MESSAGE_PRIORITY: dict[Priority, int] = {"interactive": 0, "normal": 0, "bulk": 9}
INTERACTIVE_SUFFIX = ".interactive"


def interactive_queue(queue: str) -> str:
    """The fast lane of inference queue `queue`: only interactive jobs go there, and a
    batched worker keeps slots (GPT4P_PRIORITY_SLOTS) that take jobs from nowhere else."""
    return queue + INTERACTIVE_SUFFIX


def queue_for(queue: str, priority: Priority) -> str:
    """The queue a job of `priority` meant for inference queue `queue` is sent to."""
    return interactive_queue(queue) if priority == "interactive" else queue


def worker_queue(hostname: str) -> str:
    """The queue of one batched worker alone: a conversation's next turn goes there, to
    the worker holding the conversation in its cache (workers.affinity)."""
    return f"{INFERENCE_QUEUE}.worker.{hostname}"


def worker_of(queue: str) -> str | None:
    """The hostname of the worker whose own queue (or its fast lane) `queue` is, or None."""
    prefix = worker_queue("")
    if not queue.startswith(prefix):
        return None
    return queue.removeprefix(prefix).removesuffix(INTERACTIVE_SUFFIX)


def shared_queue(queue: str) -> str:
    """`queue`, or the shared queue (with its fast lane) when `queue` is a worker's own."""
    if queue.startswith(worker_queue("")):
        return queue_for(INFERENCE_QUEUE, "interactive" if queue.endswith(INTERACTIVE_SUFFIX)
                         else "normal")  # fmt: skip
    return queue


def gpu_queue(index: int) -> str:
    """The queue consumed only by the worker pinned to GPU `index`."""
    return f"{INFERENCE_QUEUE}.gpu{index}"


def model_queue(model: str) -> str:
    """The queue consumed by every worker serving the model labelled `model`."""
    return f"{INFERENCE_QUEUE}.model.{model}"


def delivery_queue(channel: str) -> str:
    """The queue whose task sends replies out through `channel`."""
    return f"deliver.{channel}"


def delivery_task(channel: str) -> str:
    """The name of the task that sends replies out through `channel`."""
    return f"gpt4people.deliver.{channel}"


def helper_queue(name: str) -> str:
    """The queue of the helper called `name`."""
    return f"helper.{name}"


def helper_task(name: str) -> str:
    """The task that runs the helper called `name`."""
    return f"gpt4people.helper.{name}"


# A helper still running this long after its time limit (it ignored being asked to
# stop, e.g. inside C code) has its process killed: its hard time limit.
HARD_LIMIT_MARGIN_S = 5.0


# A job handed over to a helper is answered by this task, on the job's own queue, with
# the helper's result (no inference slot waits for a helper) ...
AFTER_HELPER_TASK = "gpt4people.after-helper"
# ... or, when the helper's process was killed, with a failure this errback reports.
HELPER_FAILED_TASK = "gpt4people.helper-failed"


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


Role = Literal["system", "user", "assistant", "tool"]
MAX_MESSAGE_CHARS = 2_000_000
MAX_MESSAGES = 1_000


class ToolCall(BaseModel):
    """A call of a function the caller offered (OpenAI's ``tool_calls`` entry)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    arguments: str = Field(max_length=MAX_MESSAGE_CHARS, description="JSON, as OpenAI sends it.")


class ChatMessage(BaseModel):
    """One turn of a conversation: an assistant turn may hold the tool calls it made, and a
    ``tool`` turn answers one of them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str = Field(max_length=MAX_MESSAGE_CHARS)
    tool_calls: list[ToolCall] = Field(default_factory=list, max_length=64)
    tool_call_id: str | None = Field(None, max_length=64)
    name: str | None = Field(None, max_length=64, description="The tool that answered.")


class ToolSpec(BaseModel):
    """A function the caller offers the model (OpenAI's ``tools`` entry, flattened)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = Field("", max_length=4096)
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="A JSON Schema of the arguments.",
    )
    strict: bool = False


class ResponseFormat(BaseModel):
    """What the answer must be: any text, a JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = Field(
        None, description="With type json_schema: the JSON Schema the answer must satisfy."
    )
    strict: bool = False


# "auto": text or calls; "none": text only; "required": at least one call; a name: that call.
ToolChoice = Literal["auto", "none", "required"] | str


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position, and its log probability."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """The token generated at a position, and the most likely ones there (OpenAI's shape)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


MAX_MEDIA_LINK_CHARS = 2048
# An inline picture (a data: URL) of the image helper's largest, 10 MB, in base64 with its header.
MAX_INLINE_MEDIA_CHARS = 14_000_000


def check_media_url(url: str) -> str:
    """`url` if it is a data: URL or a link of at most MAX_MEDIA_LINK_CHARS; else ValueError.

    Only inline pictures are long; a link as long as a picture is not a link."""
    if not url.startswith("data:") and len(url) > MAX_MEDIA_LINK_CHARS:
        raise ValueError(f"a media link is at most {MAX_MEDIA_LINK_CHARS} characters")
    return url


class MediaRef(BaseModel):
    """A media attachment (an MMS picture, an email attachment, an inline data: URL) for helpers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(max_length=MAX_INLINE_MEDIA_CHARS, description="A link, or a data: URL.")
    content_type: str = Field(max_length=255)

    _links_are_short = field_validator("url")(check_media_url)


class GenerationOptions(BaseModel):
    """How to generate; unset fields take the worker's defaults (GPT4P_MAX_TOKENS, ...)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stream: bool = Field(False, description="Publish text as it is generated (HTTP SSE).")
    ignore_eos: bool = Field(
        False, description="Generate max_tokens, never ending at the model's end of turn "
        "(end token or template stop string); llama-server's and vLLM's extension, for "
        "benchmarks. The caller's own stop strings still apply.",
    )  # fmt: skip
    response_format: ResponseFormat = Field(default_factory=ResponseFormat)
    tools: list[ToolSpec] = Field(default_factory=list, max_length=128)
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    logprobs: bool = Field(False, description="Return each generated token's log probability.")
    top_logprobs: int = Field(0, ge=0, le=20, description="And this many most likely tokens.")
    raw_prompt: bool = Field(
        False, description="The last message's content is the whole prompt, sent to the model "
        "as is (no chat template): the legacy completions API.",
    )  # fmt: skip
    priority: Priority | None = Field(
        None, description="How soon: interactive before normal before bulk. Unset: the "
        "channel's default (GPT4P_CHANNEL_PRIORITIES), filled in when the job is submitted.",
    )  # fmt: skip
    grammar: str | None = Field(
        None, max_length=1_000_000, description="A GBNF grammar the sampler enforces. Set by the "
        "answer path from response_format and tools, never taken from a caller.",
    )  # fmt: skip


class Job(BaseModel):
    """A prompt to answer: who asked, on which channel, what, and where the answer goes."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=_new_id, min_length=1, max_length=64)
    channel: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    user: str = Field(min_length=1, max_length=320, description="Sender: number, address, key.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    options: GenerationOptions = Field(default_factory=GenerationOptions)
    reply_to: str = Field(max_length=2048, description="Where the answer must go.")
    reply_from: str | None = Field(
        None, max_length=2048, description="Who the answer comes from (the number texted)."
    )
    media: list[MediaRef] = Field(default_factory=list, max_length=10)
    context: dict[str, str] = Field(
        default_factory=dict, description="What the channel needs to deliver (email threading)."
    )
    idempotency_key: str | None = Field(
        None, max_length=512, description="Taken from the source (MessageSid, Message-ID, ...)."
    )
    created_at: datetime = Field(default_factory=_now)

    @field_validator("messages")
    @classmethod
    def _ends_with_a_turn_to_answer(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role == "system":
            raise ValueError("the last message must be the user's, a tool's or the assistant's")
        return messages

    @property
    def prompt(self) -> str:
        """The text of the latest message: what the user asked (a tool's answer, or the start
        of the assistant's answer to continue, when the conversation ends with one)."""
        return self.messages[-1].content

    @property
    def continues_answer(self) -> bool:
        """The conversation ends with the assistant's words: continue them (prefill)."""
        return self.messages[-1].role == "assistant"

    def reply(self, text: str, model: str, engine: str, **fields: Any) -> Reply:
        """The `Reply` to this job: its addresses and channel context, with `text`."""
        fields.setdefault("context", self.context)
        return Reply(job_id=self.id, channel=self.channel, reply_to=self.reply_to,
                     reply_from=self.reply_from, text=text, model=model, engine=engine,
                     **fields)  # fmt: skip

    def to_task_arg(self) -> dict[str, object]:
        """The JSON-safe form sent to Celery."""
        return self.model_dump(mode="json")


FinishReason = Literal["stop", "length", "fallback", "tool_calls", "context_length_exceeded"]


class Reply(BaseModel):
    """The answer to one `Job`, returned by the inference task as JSON."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    channel: str
    reply_to: str
    reply_from: str | None = None
    context: dict[str, str] = Field(default_factory=dict)
    text: str = Field("", description="Never blank, unless the answer is tool calls.")
    model: str
    engine: str
    # "context_length_exceeded": the prompt could not fit; `text` is the polite sentence
    # for channels that answer people, and the HTTP API answers 400 instead.
    finish_reason: FinishReason = "stop"
    tool_calls: list[ToolCall] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    worker: str = ""
    duration_ms: float = Field(0.0, ge=0)
    created_at: datetime = Field(default_factory=_now)

    @model_validator(mode="after")
    def _not_blank(self) -> Reply:
        if not self.text.strip() and not self.tool_calls:
            raise ValueError("a reply is never blank")
        return self
