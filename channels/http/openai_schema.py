"""The request and response bodies of the OpenAI-compatible API: chat and text completions."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kernel.contract import (
    MAX_INLINE_MEDIA_CHARS,
    MAX_MESSAGE_CHARS,
    ChatMessage,
    GenerationOptions,
    MediaRef,
    Priority,
    Reply,
    ResponseFormat,
    TokenLogprob,
    ToolCall,
    ToolSpec,
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

    @field_validator("url")
    @classmethod
    def _data_or_web(cls, url: str) -> str:
        # Other schemes (file:, telegram-file:, ...) name things of ours, not the caller's.
        if not url[:8].lower().startswith(("data:", "http://", "https://")):
            raise ValueError(
                "an image_url is a data: URL or an http(s) link: other schemes are not accepted"
            )
        return url

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


class RequestFunctionCall(BaseModel):
    """The function of a tool call an assistant message made."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=64)
    arguments: str = Field("{}", max_length=MAX_MESSAGE_CHARS)


class RequestToolCall(BaseModel):
    """A tool call of an assistant message sent back in the conversation."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=64)
    type: Literal["function"] = "function"
    function: RequestFunctionCall

    def to_tool_call(self) -> ToolCall:
        """The contract's form of this call."""
        return ToolCall(id=self.id, name=self.function.name, arguments=self.function.arguments)


class RequestMessage(BaseModel):
    """A message as OpenAI clients send it; ``developer`` counts as ``system``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (
        Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | list[TextPart | ImagePart] | None
    ) = None
    tool_calls: list[RequestToolCall] | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=64)
    name: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> RequestMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return self

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
        return ChatMessage(
            role=role,
            content=self.text(),
            tool_calls=[call.to_tool_call() for call in self.tool_calls or []],
            tool_call_id=self.tool_call_id if self.role == "tool" else None,
            name=self.name if self.role == "tool" else None,
        )


class JsonSchemaFormat(BaseModel):
    """The ``json_schema`` of a ``response_format``: a named schema, strict or not."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = False


class RequestResponseFormat(BaseModel):
    """``response_format``: text, any JSON object, or JSON valid against a schema.

    llama.cpp's server form ``{"type": "json_object", "schema": {...}}`` is a schema too."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    @model_validator(mode="after")
    def _schema_given(self) -> RequestResponseFormat:
        if self.type == "json_schema" and self.json_schema is None and self.schema_ is None:
            raise ValueError("a response_format of type json_schema needs its json_schema")
        return self

    def to_contract(self) -> ResponseFormat:
        """The contract's response format."""
        if self.json_schema is not None and self.type == "json_schema":
            return ResponseFormat(type="json_schema", json_schema=self.json_schema.schema_,
                                  strict=bool(self.json_schema.strict))  # fmt: skip
        if self.schema_ is not None and self.type != "text":
            return ResponseFormat(type="json_schema", json_schema=self.schema_)
        return ResponseFormat(type=self.type)


class RequestFunction(BaseModel):
    """The function a tool offers."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = Field("", max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = False


class RequestTool(BaseModel):
    """A ``tools`` entry: a function the model may call."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: RequestFunction

    def to_spec(self) -> ToolSpec:
        """The contract's (flattened) tool."""
        fields: dict[str, Any] = {"name": self.function.name,
                                  "description": self.function.description,
                                  "strict": bool(self.function.strict)}  # fmt: skip
        if self.function.parameters is not None:
            fields["parameters"] = self.function.parameters
        return ToolSpec(**fields)


class NamedFunction(BaseModel):
    """The function a named ``tool_choice`` forces."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": NAME}}``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: NamedFunction


MAX_CHOICES = 8  # n: each choice is a job of its own


def _stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _check_stops(value: str | list[str] | None) -> str | list[str] | None:
    stops = _stop_list(value)
    if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
        raise ValueError("at most 4 stop sequences of 1 to 64 characters")
    return value


class _SamplingRequest(BaseModel):
    """The fields both completion APIs share: sampling, choices, streaming; unknown fields
    are ignored as OpenAI's server does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = False  # llama-server's and vLLM's extension, for benchmarks
    # How soon (GPT4People's extension; unset: GPT4P_CHANNEL_PRIORITIES' http, "normal").
    # OpenAI's own service_tier says the same: "priority" is interactive, "flex" bulk.
    priority: Priority | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

    _stops = field_validator("stop")(_check_stops)

    def _priority(self) -> Priority | None:
        if self.priority is not None:
            return self.priority
        tiers: dict[str, Priority] = {"priority": "interactive", "flex": "bulk"}
        return tiers.get(self.service_tier or "")

    def _options(self, max_tokens: int | None, **fields: Any) -> GenerationOptions:
        """Generation options with these shared fields, `max_tokens` and `fields`."""
        return GenerationOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=_stop_list(self.stop),
            seed=self.seed,
            stream=self.stream,
            ignore_eos=self.ignore_eos,
            priority=self._priority(),
            **fields,
        )


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[RequestMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    response_format: RequestResponseFormat | None = None
    tools: list[RequestTool] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _ends_with_a_turn(cls, messages: list[RequestMessage]) -> list[RequestMessage]:
        if messages[-1].role in {"system", "developer"}:
            raise ValueError(
                "the last message must have role 'user', 'tool' or 'assistant' (to continue it)"
            )
        return messages

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        names = {tool.function.name for tool in self.tools or []}
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(
                f"tool_choice names the function {choice.function.name!r}, "
                "which is not among the tools"
            )
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def options(self) -> GenerationOptions:
        """Generation options for the job."""
        choice = self.tool_choice
        return self._options(
            self.max_completion_tokens or self.max_tokens,
            response_format=(
                self.response_format.to_contract() if self.response_format else ResponseFormat()
            ),
            tools=[tool.to_spec() for tool in self.tools or []],
            tool_choice=(
                choice.function.name if isinstance(choice, NamedToolChoice) else choice or "auto"
            ),
            parallel_tool_calls=self.parallel_tool_calls is not False,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
        )


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``, the legacy text completion: a prompt continued as is."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=32_768)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _text_prompts(
        cls, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("the prompt list is empty")
            if not all(isinstance(p, str) for p in prompt):
                raise ValueError("token-id prompts are not supported; send the prompt as text")
            if len(prompt) > MAX_CHOICES:
                raise ValueError(f"at most {MAX_CHOICES} prompts in one request")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported (only false)")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported")
        return suffix

    @model_validator(mode="after")
    def _few_enough(self) -> CompletionRequest:
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} completions in one request (prompts x n)")
        return self

    def prompts(self) -> list[str]:
        """The prompts, one or several."""
        return [self.prompt] if isinstance(self.prompt, str) else [str(p) for p in self.prompt]

    def options(self) -> GenerationOptions:
        """Generation options for each prompt's job."""
        return self._options(
            self.max_tokens,
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
            raw_prompt=True,
        )


def completion_id(job_id: str) -> str:
    """The OpenAI-style id of the completion answering `job_id`."""
    return f"chatcmpl-{job_id}"


def text_completion_id(job_id: str) -> str:
    """The OpenAI-style id of the text completion answering `job_id`."""
    return f"cmpl-{job_id}"


def finish_reason(reply: Reply) -> str:
    """OpenAI's finish reason for `reply` (a fallback answer is a stop)."""
    if reply.finish_reason in {"length", "tool_calls"}:
        return reply.finish_reason
    return "stop"


def usage_of(replies: list[Reply]) -> dict[str, int]:
    """The usage of all `replies` together."""
    prompt = sum(r.prompt_tokens for r in replies)
    completion = sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def tool_calls_body(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """A message's ``tool_calls``."""
    return [
        {"id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls
    ]  # fmt: skip


def logprobs_body(entries: list[TokenLogprob] | None) -> dict[str, Any]:
    """A choice's ``logprobs``: ``{"content": [...]}``."""
    return {"content": [entry.model_dump() for entry in entries or []]}


def completion_body(replies: list[Reply], logprobs: bool = False) -> dict[str, Any]:
    """A ``chat.completion`` object: one choice per reply (n of them)."""
    choices = []
    for index, reply in enumerate(replies):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text or (None if reply.tool_calls else ""),
        }
        if reply.tool_calls:
            message["tool_calls"] = tool_calls_body(reply.tool_calls)
        choices.append({
            "index": index,
            "message": message,
            "logprobs": logprobs_body(reply.logprobs) if logprobs else None,
            "finish_reason": finish_reason(reply),
        })  # fmt: skip
    first = replies[0]
    return {
        "id": completion_id(first.job_id),
        "object": "chat.completion",
        "created": int(first.created_at.timestamp()),
        "model": first.model,
        "choices": choices,
        "usage": usage_of(replies),
    }


def chunk_body(
    job_id: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    index: int = 0,
    logprobs: list[TokenLogprob] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object for streaming."""
    body: dict[str, Any] = {
        "id": completion_id(job_id),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": index,
            "delta": delta,
            "logprobs": logprobs_body(logprobs) if logprobs is not None else None,
            "finish_reason": finish_reason,
        }],
    }  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return body


def legacy_logprobs(entries: list[TokenLogprob] | None, top: int, offset: int) -> dict[str, Any]:
    """The legacy completions' ``logprobs``: tokens, their logprobs, the `top` likeliest
    tokens at each (and the sampled one, as OpenAI does), each token's offset in the text
    (counted from `offset`, the prompt's length: the text follows the prompt)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry in entries or []:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        likeliest = {t.token: t.logprob for t in entry.top_logprobs[:top]}
        likeliest.setdefault(entry.token, entry.logprob)
        tops.append(likeliest)
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def text_choice(
    index: int,
    text: str,
    finish: str | None,
    logprobs: dict[str, Any] | None,
) -> dict[str, Any]:
    """One choice of a ``text_completion``."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def text_completion_body(
    job_id: str, model: str, created: int, choices: list[dict[str, Any]],
    usage: dict[str, int] | None,
) -> dict[str, Any]:  # fmt: skip
    """A ``text_completion`` object (whole, or a streamed chunk of one)."""
    body: dict[str, Any] = {
        "id": text_completion_id(job_id),
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
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
