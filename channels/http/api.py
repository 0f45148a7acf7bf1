"""The HTTP channel: OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``
that go through the queue.

A request of ``n`` choices is ``n`` jobs (seeds ``seed + i`` when a seed is given). Before
anything is queued the request is checked as the worker would: a response format or tools
that cannot become a grammar, or a prompt that cannot fit the model's context, is a 400.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import redis
import redis.asyncio as aioredis
from celery import Celery
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from channels.base import InvalidInboundError
from channels.http.guard import BODY_BYTES_SCOPE_KEY, CALLER_SCOPE_KEY, OPEN_CALLER, ApiKeys
from channels.http.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    finish_reason,
    legacy_logprobs,
    text_choice,
    text_completion_body,
    tool_calls_body,
    usage_of,
)
from kernel.contract import (
    INFERENCE_QUEUE,
    ChatMessage,
    GenerationOptions,
    Job,
    Reply,
    TokenLogprob,
    model_queue,
)
from kernel.keys import IDEMPOTENCY_PREFIX
from kernel.model_files import model_label
from kernel.redis_client import RedisUnavailableError
from kernel.settings import Settings
from kernel.streaming import decode_stream_event, stream_channel
from workers.client import (
    IDEMPOTENCY_TTL_S,
    JobFailedError,
    JobTimeoutError,
    await_reply,
    submit,
)
from workers.liveness import served_models

log = logging.getLogger(__name__)


# Which body an HTTP caller first sent with an Idempotency-Key (a hash of it), per caller.
IDEMPOTENCY_BODY_PREFIX = f"{IDEMPOTENCY_PREFIX}http-body:"
MAX_IMAGES = 10


class ApiError(Exception):
    """An error answered in OpenAI's error format with an HTTP status."""

    def __init__(
        self, status: int, message: str, kind: str, code: str | None = None,
        param: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.param = param

    def response(self) -> JSONResponse:
        """The JSON error response."""
        body = error_body(self.message, self.kind, self.code, self.param)
        return JSONResponse(body, status_code=self.status)


class RequestTooLargeError(InvalidInboundError):
    """The request is over a size limit (answered 413); the message names the limit."""


def text_allowance(settings: Settings) -> int:
    """Bytes of a request body besides its inline images: far past any prompt we accept."""
    return settings.max_prompt_chars * 4 + 64 * 1024


def body_limit(settings: Settings) -> tuple[int, str]:
    """The largest chat completions body, and the message that refuses a larger one."""
    # base64 makes 3 bytes 4 characters; 1 KiB more for the data: headers of the images.
    images = (
        -(-settings.http_max_image_bytes // 3) * 4 + 1024 if settings.http_max_image_bytes else 0
    )
    limit = text_allowance(settings) + images
    allowed = f"a prompt of at most {settings.max_prompt_chars} characters"
    if images:
        allowed += f" and inline images of at most {settings.http_max_image_bytes} bytes"
    return limit, f"the request body is larger than {limit} bytes ({allowed})"


class HttpChannel:
    """Turns an OpenAI chat or text completions request into jobs, one per choice."""

    name = "http"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def to_job(
        self,
        inbound: object,
        idempotency_key: str | None = None,
        body_bytes: int = 0,
        caller: str = OPEN_CALLER,
    ) -> Job:
        """A job for a validated `ChatCompletionRequest` whose body was `body_bytes` long.

        Its sender is the `caller` (the hash of the API key used), not the request's own
        ``user`` field: per-sender limits must not be dodged by naming another user."""
        if not isinstance(inbound, ChatCompletionRequest):
            raise InvalidInboundError("expected a chat completions request")
        self._check_sizes(inbound, body_bytes)
        messages = [m.to_chat_message() for m in inbound.messages]
        media = inbound.messages[-1].media()[:MAX_IMAGES]
        if not messages[-1].content.strip() and not media:
            raise InvalidInboundError(f"the last message (role {messages[-1].role}) is empty")
        return Job(
            channel=self.name,
            user=caller,
            messages=messages,
            options=inbound.options(),
            reply_to="http",
            media=media,
            idempotency_key=idempotency_key,
        )

    def text_jobs(self, inbound: CompletionRequest, caller: str = OPEN_CALLER) -> list[Job]:
        """The jobs of a text completion: each prompt sent as is (``raw_prompt``), ``n``
        times, in OpenAI's order (every choice of the first prompt, then the next's)."""
        jobs = []
        for prompt in inbound.prompts():
            if not prompt.strip():
                raise InvalidInboundError("the prompt is empty")
            if len(prompt) > self.settings.max_prompt_chars:
                raise InvalidInboundError(
                    f"the prompt is {len(prompt)} characters long; the limit is "
                    f"{self.settings.max_prompt_chars}"
                )
            job = Job(channel=self.name, user=caller, reply_to="http",
                      messages=[ChatMessage(role="user", content=prompt)],
                      options=inbound.options())  # fmt: skip
            jobs += choices_of(job, inbound.n)
        return jobs

    def _check_sizes(self, inbound: ChatCompletionRequest, body_bytes: int) -> None:
        """Refuse what is over a limit before any of it is copied into a job."""
        settings = self.settings
        # Images aside, the body must fit what a prompt needs (no megabytes of ignored fields).
        rest = body_bytes - sum(m.inline_image_chars() for m in inbound.messages)
        if rest > text_allowance(settings):
            raise RequestTooLargeError(
                f"the request body is larger than {text_allowance(settings)} bytes "
                f"besides its inline images (a prompt of at most {settings.max_prompt_chars} "
                "characters)"
            )
        images = sum(m.inline_image_bytes() for m in inbound.messages)
        if images > settings.http_max_image_bytes:
            raise RequestTooLargeError(
                f"the inline images are {images} bytes; the limit is "
                f"{settings.http_max_image_bytes} (GPT4P_HTTP_MAX_IMAGE_BYTES)"
            )
        size = sum(len(m.text()) for m in inbound.messages)
        if size > settings.max_prompt_chars:
            raise InvalidInboundError(
                f"the messages are {size} characters long; the limit is {settings.max_prompt_chars}"
            )


def _state(request: Request) -> tuple[Settings, Celery, aioredis.Redis]:
    state = request.app.state
    return state.settings, state.celery, state.redis


def require_api_key(request: Request) -> str:
    """The caller's id; 401 unless the request carries an API key (when keys are set).

    `ApiKeyGuard` already refused such a request before its body was read; this
    keeps the router safe wherever it is mounted."""
    caller = request.scope.get(CALLER_SCOPE_KEY)
    if caller is None:
        # Starlette decodes headers as latin-1: encoding back gives the bytes sent.
        header = request.headers.get("authorization", "").encode("latin-1")
        caller = ApiKeys(request.app.state.settings).caller(header)
    if caller is None:
        raise ApiError(401, "missing or wrong API key", "authentication_error", "invalid_api_key")
    return str(caller)


router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The model this deployment serves."""
    settings, _, _ = _state(request)
    served = await asyncio.to_thread(served_models, request.app.state.sync_redis)
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "owned_by": "gpt4people"}
            for model in served or [model_label(settings)]
        ],
    }


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request,
    body: ChatCompletionRequest,
    caller: Annotated[str, Depends(require_api_key)],
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    """Answer a chat completion through the queue, as JSON or as server-sent events."""
    settings = _state(request)[0]
    body_bytes = int(request.scope.get(BODY_BYTES_SCOPE_KEY, 0))
    try:
        job = HttpChannel(settings).to_job(body, None, body_bytes, _sender(request, caller))
    except RequestTooLargeError as error:
        raise ApiError(413, str(error), "invalid_request_error", "request_too_large") from None
    except InvalidInboundError as error:
        raise ApiError(400, str(error), "invalid_request_error") from None
    return await _answer_request(
        request, body, choices_of(job, body.n), caller, idempotency_key,
        lambda jobs: _ChatChunks(settings, body.logprobs is True, jobs),
    )  # fmt: skip


@router.post("/completions", response_model=None)
async def completions(
    request: Request,
    body: CompletionRequest,
    caller: Annotated[str, Depends(require_api_key)],
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    """Continue a prompt as is (the legacy text completion), through the same queue."""
    settings = _state(request)[0]
    try:
        jobs = HttpChannel(settings).text_jobs(body, _sender(request, caller))
    except InvalidInboundError as error:
        raise ApiError(400, str(error), "invalid_request_error") from None
    return await _answer_request(
        request, body, jobs, caller, idempotency_key,
        lambda jobs: _TextChunks(settings, body.logprobs, jobs),
    )  # fmt: skip


async def _answer_request(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    jobs: list[Job],
    caller: str,
    idempotency_key: str | None,
    renderer_for: Callable[[list[Job]], _Renderer],
) -> Response:
    """Check `jobs` as a worker would, key them for retries, then queue and answer them."""
    settings, _, client = _state(request)
    if caller == OPEN_CALLER:
        jobs = [_not_interactive(job) for job in jobs]
    await _check_before_queueing(jobs, settings)
    if idempotency_key:
        scoped = await _scoped_idempotency_key(client, caller, idempotency_key, body)
        jobs = _with_idempotency_keys(jobs, scoped)
    return await _answer(request, body.model, jobs, body.stream, renderer_for(jobs))


def _not_interactive(job: Job) -> Job:
    """`job` at its channel's priority if it asked to be interactive: on an open API (no
    keys) anyone could, and an interactive job pauses everyone else's in its batch; an
    operator who issues keys decides who may."""
    if job.options.priority != "interactive":
        return job
    return job.model_copy(update={"options": job.options.model_copy(update={"priority": None})})


def choices_of(job: Job, n: int) -> list[Job]:
    """`job` and n - 1 copies of it (new ids), each its own sample: seed + i when seeded."""
    jobs = [job]
    for i in range(1, n):
        seed = job.options.seed
        options = job.options.model_copy(
            update={"seed": None if seed is None else (seed + i) % 2**32}
        )
        jobs.append(job.model_copy(update={"id": uuid.uuid4().hex, "options": options}))
    return jobs


def _with_idempotency_keys(jobs: list[Job], scoped: str) -> list[Job]:
    # The first choice keeps the request's key; the others are keyed by their place.
    return [
        job.model_copy(update={"idempotency_key": scoped if i == 0 else f"{scoped}:{i}"})
        for i, job in enumerate(jobs)
    ]


async def _answer(
    request: Request, model: str | None, jobs: list[Job], stream: bool, renderer: _Renderer
) -> Response:
    """Queue `jobs` and answer with their replies, whole or streamed."""
    settings, celery, client = _state(request)
    sync_client = request.app.state.sync_redis
    queue = await _queue_for(model, sync_client)
    if stream:
        return StreamingResponse(
            _stream(celery, client, sync_client, jobs, settings, queue, renderer),
            media_type="text/event-stream",
        )
    ids = [await _submit(celery, job, sync_client, queue) for job in jobs]
    replies = await asyncio.gather(*(_await(client, i, settings.job_timeout) for i in ids))
    for reply in replies:
        if reply.finish_reason == "context_length_exceeded":
            raise _too_long(f"the prompt does not fit the model's context ({reply.text})")
    return JSONResponse(renderer.whole(list(replies)))


def _too_long(message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "context_length_exceeded", "messages")


async def _check_before_queueing(jobs: list[Job], settings: Settings) -> None:
    """400 for what a worker could only refuse: a response format or tools that cannot
    become a grammar, a prompt that cannot fit the model's context (counted with the
    model's own vocabulary, when this host has the model file)."""
    _check_logprobs_volume(jobs, settings)
    seen: set[str] = set()
    for job in jobs:
        prompt = job.prompt
        if prompt in seen:
            continue  # the n choices of one prompt are one check
        seen.add(prompt)
        if _needs_grammar(job.options):
            problem = await asyncio.to_thread(_grammar_problem, job.options)
            if problem is not None:
                raise ApiError(400, problem, "invalid_request_error", None, _grammar_param(job))
        if _surely_fits(job.messages, job.options, settings):
            continue  # no need to count (a thread and the model's vocabulary) what fits
        counted = await asyncio.to_thread(_overflow, job.messages, job.options, settings)
        if counted is not None:
            tokens, limit = counted
            raise _too_long(
                f"This model's maximum context length is {limit} tokens for the prompt. "
                f"However, your {'prompt' if job.options.raw_prompt else 'messages'} "
                f"resulted in {tokens} tokens. Please reduce the length of the "
                f"{'prompt' if job.options.raw_prompt else 'messages'}."
            )


# Log probabilities one request may ask for in all (tokens x (1 + top_logprobs) x choices):
# about 2 KB each in the stored result at top_logprobs 20.
MAX_LOGPROB_ENTRIES = 100_000


def _check_logprobs_volume(jobs: list[Job], settings: Settings) -> None:
    """400 when the logprobs asked for would make a result of hundreds of megabytes."""
    asked = [job.options for job in jobs if job.options.logprobs]
    entries = sum(
        min(o.max_tokens or settings.max_tokens, settings.max_tokens) * (1 + o.top_logprobs)
        for o in asked
    )
    if entries > MAX_LOGPROB_ENTRIES:
        raise ApiError(400, f"logprobs for at most {MAX_LOGPROB_ENTRIES} tokens in all "
                       "(answer tokens x (1 + top_logprobs) x choices): ask for fewer",
                       "invalid_request_error", None, "top_logprobs")  # fmt: skip


def _grammar_param(job: Job) -> str:
    return "tools" if job.options.tools else "response_format"


def _needs_grammar(options: GenerationOptions) -> bool:
    """Whether the answer must follow a grammar (a response format, tools)."""
    return options.response_format.type != "text" or bool(options.tools)


# Template text per message (role markers, separators) counted at most this many tokens
# in `_surely_fits`: far above any chat template's.
TEMPLATE_TOKENS_PER_MESSAGE = 64


def _surely_fits(
    messages: Sequence[ChatMessage], options: GenerationOptions, settings: Settings
) -> bool:
    """Whether the prompt fits the context without counting its tokens: no byte-level
    tokenizer makes more tokens than the text has UTF-8 bytes, so the bytes of every
    message, the system prompt and the tools, plus a generous allowance per message for
    the template, bound the count."""
    from answer.engines import tokenizer

    text = sum(len(m.content.encode()) + sum(len(c.arguments) + len(c.name) for c in m.tool_calls)
               for m in messages)  # fmt: skip
    tools = len(json.dumps([t.model_dump() for t in options.tools])) if options.tools else 0
    bound = (text + len(settings.system_prompt.encode()) + tools
             + TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 2))  # fmt: skip
    return bound <= tokenizer.context_limit(options, settings)


def _grammar_problem(options: GenerationOptions) -> str | None:
    """Why `options` cannot be enforced by a grammar, or None."""
    if not _needs_grammar(options):
        return None
    from answer.engines.grammar import grammar_for

    try:
        grammar_for(options)
    except ValueError as error:
        return str(error)
    return None


def _overflow(
    messages: Sequence[ChatMessage], options: GenerationOptions, settings: Settings
) -> tuple[int, int] | None:
    """(tokens, limit) when the prompt cannot fit, None when it fits or cannot be counted
    here (no model file on this host: the worker's reply says so instead)."""
    from answer.engines import tokenizer

    try:
        tokens = tokenizer.prompt_tokens(messages, options, settings)
    except Exception as error:  # noqa: BLE001 - counting is a courtesy; the worker decides
        log.warning("could not count the prompt's tokens (%s)", type(error).__name__)
        return None
    if tokens is None:
        return None
    limit = tokenizer.context_limit(options, settings)
    return (tokens, limit) if tokens > limit else None


def _sender(request: Request, caller: str) -> str:
    """Who a request counts as for per-sender limits: its API key; without keys, the
    client's address (hashed), so that one open caller cannot spend everyone's budget."""
    if caller != OPEN_CALLER:
        return caller
    host = request.client.host if request.client else "unknown"
    return "addr-" + hashlib.sha256(host.encode()).hexdigest()[:16]


async def _scoped_idempotency_key(
    client: aioredis.Redis, caller: str, key: str, body: ChatCompletionRequest | CompletionRequest
) -> str:
    """The job's idempotency key: `key` scoped to the caller's API key and to this body.

    Another caller's request never finds this caller's answer (another scope), and
    this caller reusing `key` for another body gets a 422, as Stripe answers."""
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:32]
    record = f"{IDEMPOTENCY_BODY_PREFIX}{caller}:{name}"
    try:
        if not await client.set(record, fingerprint, nx=True, ex=IDEMPOTENCY_TTL_S):
            first = await client.get(record)
            if first is not None and first.decode() != fingerprint:
                raise ApiError(
                    422, "this Idempotency-Key was already used with a different request body; "
                    "send a new key for a new request", "invalid_request_error",
                    "idempotency_key_reused", "Idempotency-Key",
                )  # fmt: skip
    except aioredis.RedisError:
        raise ApiError(503, "the queue is unavailable; try again shortly", "server_error") from None
    # The body's hash in the job's key too: even a lost record cannot hand out another answer.
    return f"{caller}:{name}:{fingerprint}"


# Which models live workers serve, asked of Redis at most once a second per web process
# (every request names a model; workers come and go far less often).
SERVED_MODELS_TTL_S = 1.0
_served: dict[int, tuple[float, list[str]]] = {}


async def _served_models(client: redis.Redis) -> list[str]:
    now = time.monotonic()
    known = _served.get(id(client))
    if known is None or known[0] <= now:
        known = (now + SERVED_MODELS_TTL_S, await asyncio.to_thread(served_models, client))
        _served[id(client)] = known
    return known[1]


async def _queue_for(model: str | None, client: redis.Redis) -> str:
    """The queue of the model the request names, when a live worker serves it."""
    if not model:
        return INFERENCE_QUEUE
    try:
        served = await _served_models(client)
    except redis.RedisError:
        return INFERENCE_QUEUE  # _submit reports the outage
    # Clients send whatever model name they were written for: only a name we serve routes.
    return model_queue(model) if model in served else INFERENCE_QUEUE


async def _submit(celery: Celery, job: Job, client: redis.Redis, queue: str) -> str:
    try:
        return await asyncio.to_thread(submit, celery, job, queue, client)
    except RedisUnavailableError as error:
        log.error("enqueue failed: %s", error)
        raise ApiError(503, "the queue is unavailable; try again shortly", "server_error") from None


async def _await(client: aioredis.Redis, job_id: str, timeout: float) -> Reply:
    try:
        return await await_reply(client, job_id, timeout)
    except JobTimeoutError as error:
        raise ApiError(504, f"{error}; is a worker running?", "timeout") from None
    except JobFailedError as error:
        raise ApiError(502, str(error), "server_error") from None
    except aioredis.RedisError:
        raise ApiError(503, "the queue is unavailable; try again shortly", "server_error") from None


def _sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def _event(raw: bytes | str) -> tuple[str, str, list[TokenLogprob]]:
    """The kind, text and logprobs (when the job asked for them) of a streaming event."""
    event = decode_stream_event(raw)
    return event.kind, event.text, event.logprobs or []


@dataclass
class _Choice:
    """What of one choice's answer a stream has sent."""

    index: int
    job: Job
    sent: str = ""
    logprobs_sent: int = 0
    ended: bool = False
    # With tools offered, an answer that starts with "{" is a call: its JSON is not text.
    held: str = ""
    is_call: bool = False
    pending: list[TokenLogprob] = field(default_factory=list)


class _Renderer(Protocol):
    """How one API writes its answers: whole, or as stream chunks."""

    def whole(self, replies: list[Reply]) -> dict[str, Any]:
        """The whole answer of these replies, one choice each."""

    def start(self, choice: _Choice) -> dict[str, Any] | None:
        """The chunk that opens `choice`, if any."""

    def delta(self, choice: _Choice, text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        """The chunk of a piece of `choice`'s text (`choice.sent` already holds it)."""

    def tail(self, choice: _Choice, reply: Reply) -> list[dict[str, Any]]:
        """The chunks of what follows the text (tool calls)."""

    def finish(self, choice: _Choice, reply: Reply, usage: dict[str, int] | None) -> dict[str, Any]:
        """The chunk that closes `choice` (with the usage of all, on the last)."""

    def strips(self, choice: _Choice) -> bool:
        """Whether the leading blanks of `choice`'s answer are dropped."""


class _ChatChunks:
    """``chat.completion`` objects and their chunks."""

    def __init__(self, settings: Settings, logprobs: bool, jobs: list[Job]) -> None:
        self.model, self.logprobs, self.id = model_label(settings), logprobs, jobs[0].id

    def whole(self, replies: list[Reply]) -> dict[str, Any]:
        return completion_body(replies, self.logprobs)

    def _chunk(self, choice: _Choice, delta: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return chunk_body(self.id, self.model, delta, index=choice.index, **fields)

    def start(self, choice: _Choice) -> dict[str, Any] | None:
        return self._chunk(choice, {"role": "assistant", "content": ""})

    def delta(self, choice: _Choice, text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return self._chunk(choice, {"content": text},
                           logprobs=logprobs if self.logprobs else None)  # fmt: skip

    def tail(self, choice: _Choice, reply: Reply) -> list[dict[str, Any]]:
        chunks = []
        for place, call in enumerate(tool_calls_body(reply.tool_calls)):
            name = {"name": call["function"]["name"], "arguments": ""}
            chunks.append(
                self._chunk(
                    choice,
                    {
                        "tool_calls": [
                            {"index": place, "id": call["id"], "type": "function", "function": name}
                        ]
                    },
                )
            )
            arguments = {"arguments": call["function"]["arguments"]}
            chunks.append(self._chunk(choice, {"tool_calls": [
                {"index": place, "function": arguments}]}))  # fmt: skip
        return chunks

    def finish(self, choice: _Choice, reply: Reply, usage: dict[str, int] | None) -> dict[str, Any]:
        return self._chunk(choice, {}, finish_reason=finish_reason(reply), usage=usage)

    def strips(self, choice: _Choice) -> bool:
        return not choice.job.continues_answer  # a continuation's first blank is its own


class _TextChunks:
    """``text_completion`` objects and their chunks, with the legacy logprobs."""

    def __init__(self, settings: Settings, logprobs: int | None, jobs: list[Job]) -> None:
        self.model, self.top, self.jobs = model_label(settings), logprobs, jobs
        self.id = jobs[0].id
        self.created = int(jobs[0].created_at.timestamp())

    def _legacy(self, choice: _Choice, entries: list[TokenLogprob] | None, offset: int
                ) -> dict[str, Any] | None:  # fmt: skip
        if self.top is None:
            return None
        return legacy_logprobs(entries, self.top, len(choice.job.prompt) + offset)

    def whole(self, replies: list[Reply]) -> dict[str, Any]:
        choices = [
            text_choice(i, reply.text, finish_reason(reply),
                        self._legacy(_Choice(i, job), reply.logprobs, 0))
            for i, (reply, job) in enumerate(zip(replies, self.jobs, strict=True))
        ]  # fmt: skip
        return text_completion_body(self.id, replies[0].model, self.created, choices,
                                    usage_of(replies))  # fmt: skip

    def _chunk(self, choice: dict[str, Any], usage: dict[str, int] | None = None
               ) -> dict[str, Any]:  # fmt: skip
        return text_completion_body(self.id, self.model, self.created, [choice], usage)

    def start(self, choice: _Choice) -> dict[str, Any] | None:
        return None

    def delta(self, choice: _Choice, text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        offset = len(choice.sent) - len(text)
        return self._chunk(text_choice(choice.index, text, None,
                                       self._legacy(choice, logprobs, offset)))  # fmt: skip

    def tail(self, choice: _Choice, reply: Reply) -> list[dict[str, Any]]:
        return []

    def finish(self, choice: _Choice, reply: Reply, usage: dict[str, int] | None) -> dict[str, Any]:
        return self._chunk(text_choice(choice.index, "", finish_reason(reply), None), usage)

    def strips(self, choice: _Choice) -> bool:
        return False  # a prompt's continuation keeps every character


async def _stream(
    celery: Celery,
    client: aioredis.Redis,
    sync_client: redis.Redis,
    jobs: list[Job],
    settings: Settings,
    queue: str,
    renderer: _Renderer,
) -> AsyncIterator[str]:
    """Server-sent events: each choice's text as its worker generates it, then each
    choice's tool calls and finish, and the usage of all with the last."""
    choices = [_Choice(i, job) for i, job in enumerate(jobs)]
    by_channel = {stream_channel(c.job.id): c for c in choices}
    async with client.pubsub() as pubsub:
        # Subscribe before enqueueing so that not one delta is missed.
        await pubsub.subscribe(*[stream_channel(c.job.id) for c in choices])
        try:
            ids = [await _submit(celery, c.job, sync_client, queue) for c in choices]
        except ApiError as error:
            yield _sse(error_body(error.message, error.kind))
            return
        for choice in choices:
            start = renderer.start(choice)
            if start is not None:
                yield _sse(start)
        tasks = [
            asyncio.create_task(await_reply(client, job_id, settings.job_timeout)) for job_id in ids
        ]
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message is None:
                    # Every delta was published before its reply was stored.
                    if all(c.ended or t.done() for c, t in zip(choices, tasks, strict=True)):
                        break
                    continue
                channel = message["channel"]
                current = by_channel.get(
                    channel.decode() if isinstance(channel, bytes) else str(channel)
                )
                if current is None:
                    continue
                kind, text, logprobs = _event(message["data"])
                if kind == "end":
                    current.ended = True  # the whole text is here; the reply is being stored
                    if all(c.ended for c in choices):
                        break  # not a moment later: the replies come next
                elif kind == "delta":
                    text = _shown(current, text, renderer.strips(current))
                    current.pending += logprobs  # a held or blank piece's go with the next
                    if text:
                        current.sent += text
                        current.logprobs_sent += len(current.pending)
                        yield _sse(renderer.delta(current, text, current.pending))
                        current.pending = []
            replies = [await task for task in tasks]
        except (JobTimeoutError, JobFailedError) as error:
            yield _sse(error_body(str(error), "server_error"))
            return
        except aioredis.RedisError:
            yield _sse(error_body("the queue became unavailable", "server_error"))
            return
        finally:
            for task in tasks:
                task.cancel()
    for reply in replies:
        if reply.finish_reason == "context_length_exceeded":
            message = f"the prompt does not fit the model's context ({reply.text})"
            body = error_body(message, "invalid_request_error", "context_length_exceeded")
            yield _sse(body)
            return
    for place, (choice, reply) in enumerate(zip(choices, replies, strict=True)):
        # Deltas never published (a duplicate request, a fallback answer) still reach the
        # client, and the logprobs of tokens the stream did not carry.
        rest = reply.text[len(choice.sent) :] if reply.text.startswith(choice.sent) else ""
        logprobs = (reply.logprobs or [])[choice.logprobs_sent :]
        if rest or logprobs:
            choice.sent += rest
            yield _sse(renderer.delta(choice, rest, logprobs))
        for chunk in renderer.tail(choice, reply):
            yield _sse(chunk)
        last = place == len(choices) - 1
        yield _sse(renderer.finish(choice, reply, usage_of(replies) if last else None))
    yield _sse("[DONE]")


def _shown(choice: _Choice, text: str, strip: bool) -> str:
    """What of a delta to send: leading blanks of the answer dropped (when `strip`), and
    nothing of an answer that starts as a tool call (the reply brings the call)."""
    if choice.is_call:
        return ""
    tools = choice.job.options.tools and choice.job.options.tool_choice != "none"
    if not choice.sent and tools:
        choice.held += text
        if not choice.held.strip():
            return ""
        if choice.held.lstrip().startswith("{"):
            choice.is_call = True
            return ""
        text, choice.held = choice.held, ""
    return text.lstrip() if strip and not choice.sent else text


__all__ = ["ApiError", "HttpChannel", "RequestTooLargeError", "body_limit", "choices_of", "router"]
