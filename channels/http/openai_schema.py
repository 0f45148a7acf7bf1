"""The request and response bodies of the OpenAI-compatible chat completions API."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kernel.contract import (
    MAX_INLINE_MEDIA_CHARS,
    MAX_MESSAGE_CHARS,
    ChatMessage,
    GenerationOptions,
    MediaRef,
    Reply,
    check_media_url,
)

# The media type of a data: URL: a short type/subtype, nothing that could be a payload.
_DATA_URL_TYPE = re.compile(r"data:([\w.+-]{1,64}/[\w.+-]{1,64})[;,]")


class TextPart(BaseModel):
    """A text part of a multi-part message content."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ImageUrl(BaseModel):
    """The image of an ``image_url`` part: a data: URL or a link."""

    model_config = ConfigDict(extra="ignore")

    url: str = Field(max_length=MAX_INLINE_MEDIA_CHARS)

    _links_are_short = field_validator("url")(check_media_url)

    def inline_bytes(self) -> int:
        """About how many bytes this image is once decoded, when it is inline (else 0)."""
        if not self.url.startswith("data:"):
            return 0
        header, _, payload = self.url.partition(",")
        return len(payload) * 3 // 4 if header.endswith(";base64") else len(payload)


class ImagePart(BaseModel):
    """An image part of a multi-part message content (routed to the image helper)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["image_url"]
    image_url: ImageUrl

    def to_media(self) -> MediaRef:
        """The contract's reference to this image."""
        url = self.image_url.url
        match = _DATA_URL_TYPE.match(url)
        return MediaRef(url=url, content_type=match.group(1) if match else "image/*")


class RequestMessage(BaseModel):
    """A message as OpenAI clients send it; ``developer`` counts as ``system``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | list[TextPart | ImagePart] | None
    ) = None

    def media(self) -> list[MediaRef]:
        """The images of this message."""
        if not isinstance(self.content, list):
            return []
        return [part.to_media() for part in self.content if isinstance(part, ImagePart)]

    def text(self) -> str:
        """The text of this message, its text parts joined."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    def inline_image_bytes(self) -> int:
        """About how many bytes this message's inline images are, decoded."""
        if not isinstance(self.content, list):
            return 0
        parts = [p for p in self.content if isinstance(p, ImagePart)]
        return sum(part.image_url.inline_bytes() for part in parts)

    def inline_image_chars(self) -> int:
        """How many characters of the request this message's inline images take."""
        if not isinstance(self.content, list):
            return 0
        urls = [p.image_url.url for p in self.content if isinstance(p, ImagePart)]
        return sum(len(url) for url in urls if url.startswith("data:"))

    def to_chat_message(self) -> ChatMessage:
        """The contract's form of this message."""
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=self.text())


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; unknown fields are ignored as OpenAI's server does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[RequestMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = False  # llama-server's and vLLM's extension, for benchmarks

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("at most 4 stop sequences of 1 to 64 characters")
        return value

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, messages: list[RequestMessage]) -> list[RequestMessage]:
        if messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return messages

    def options(self) -> GenerationOptions:
        """Generation options for the job."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationOptions(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stops,
            seed=self.seed,
            stream=self.stream,
            ignore_eos=self.ignore_eos,
        )


def completion_id(job_id: str) -> str:
    """The OpenAI-style id of the completion answering `job_id`."""
    return f"chatcmpl-{job_id}"


def completion_body(reply: Reply) -> dict[str, Any]:
    """A ``chat.completion`` object for `reply`."""
    return {
        "id": completion_id(reply.job_id),
        "object": "chat.completion",
        "created": int(reply.created_at.timestamp()),
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": "length" if reply.finish_reason == "length" else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    }


def chunk_body(
    job_id: str,
    model: str,
    delta: dict[str, str],
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object for streaming."""
    body: dict[str, Any] = {
        "id": completion_id(job_id),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def error_body(
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
