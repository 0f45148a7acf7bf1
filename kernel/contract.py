"""The contract between channels, the core and helpers: `Job`, `Reply`, task and queue names.

Light on purpose: channels and helpers import this module without importing
Celery's worker side or llama.cpp. Everything here crosses Redis as JSON.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Queue names are public surface (README, "Operations"): operators route and scale by them.
INFERENCE_QUEUE = "inference"
INFERENCE_TASK = "gpt4people.inference"


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


Role = Literal["system", "user", "assistant"]
MAX_MESSAGE_CHARS = 2_000_000
MAX_MESSAGES = 1_000


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


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
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return messages

    @property
    def prompt(self) -> str:
        """The text of the latest user message."""
        return self.messages[-1].content

    def reply(self, text: str, model: str, engine: str, **fields: Any) -> Reply:
        """The `Reply` to this job: its addresses and channel context, with `text`."""
        fields.setdefault("context", self.context)
        return Reply(job_id=self.id, channel=self.channel, reply_to=self.reply_to,
                     reply_from=self.reply_from, text=text, model=model, engine=engine,
                     **fields)  # fmt: skip

    def to_task_arg(self) -> dict[str, object]:
        """The JSON-safe form sent to Celery."""
        return self.model_dump(mode="json")


FinishReason = Literal["stop", "length", "fallback"]


class Reply(BaseModel):
    """The answer to one `Job`, returned by the inference task as JSON."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    channel: str
    reply_to: str
    reply_from: str | None = None
    context: dict[str, str] = Field(default_factory=dict)
    text: str = Field(min_length=1)
    model: str
    engine: str
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    worker: str = ""
    duration_ms: float = Field(0.0, ge=0)
    created_at: datetime = Field(default_factory=_now)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("a reply is never blank")
        return text
