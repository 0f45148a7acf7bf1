"""The HTTP channel: an OpenAI-compatible ``/v1/chat/completions`` that goes through the queue."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
import redis.asyncio as aioredis
from celery import Celery
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from channels.base import InvalidInboundError
from channels.http.guard import BODY_BYTES_SCOPE_KEY, CALLER_SCOPE_KEY, OPEN_CALLER, ApiKeys
from channels.http.openai_schema import (
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    error_body,
)
from kernel.contract import INFERENCE_QUEUE, Job, Reply, model_queue
from kernel.keys import IDEMPOTENCY_PREFIX
from kernel.model_files import model_label
from kernel.redis_client import RedisUnavailableError
from kernel.settings import Settings
from kernel.streaming import decode_event, stream_channel
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
    """Turns an OpenAI chat completions request into a job."""

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
            raise InvalidInboundError("the last user message is empty")
        return Job(
            channel=self.name,
            user=caller,
            messages=messages,
            options=inbound.options(),
            reply_to="http",
            media=media,
            idempotency_key=idempotency_key,
        )

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
    settings, celery, client = _state(request)
    body_bytes = int(request.scope.get(BODY_BYTES_SCOPE_KEY, 0))
    try:
        job = HttpChannel(settings).to_job(body, None, body_bytes, _sender(request, caller))
    except RequestTooLargeError as error:
        raise ApiError(413, str(error), "invalid_request_error", "request_too_large") from None
    except InvalidInboundError as error:
        raise ApiError(400, str(error), "invalid_request_error") from None
    if idempotency_key:
        scoped = await _scoped_idempotency_key(client, caller, idempotency_key, body)
        job = job.model_copy(update={"idempotency_key": scoped})
    sync_client = request.app.state.sync_redis
    queue = await _queue_for(body.model, sync_client)
    if body.stream:
        return StreamingResponse(
            _stream(celery, client, sync_client, job, settings, queue),
            media_type="text/event-stream",
        )
    job_id = await _submit(celery, job, sync_client, queue)
    reply = await _await(client, job_id, settings.job_timeout)
    return JSONResponse(completion_body(reply))


def _sender(request: Request, caller: str) -> str:
    """Who a request counts as for per-sender limits: its API key; without keys, the
    client's address (hashed), so that one open caller cannot spend everyone's budget."""
    if caller != OPEN_CALLER:
        return caller
    host = request.client.host if request.client else "unknown"
    return "addr-" + hashlib.sha256(host.encode()).hexdigest()[:16]


async def _scoped_idempotency_key(
    client: aioredis.Redis, caller: str, key: str, body: ChatCompletionRequest
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


async def _queue_for(model: str | None, client: redis.Redis) -> str:
    """The queue of the model the request names, when a live worker serves it."""
    if not model:
        return INFERENCE_QUEUE
    try:
        served = await asyncio.to_thread(served_models, client)
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


async def _stream(
    celery: Celery,
    client: aioredis.Redis,
    sync_client: redis.Redis,
    job: Job,
    settings: Settings,
    queue: str,
) -> AsyncIterator[str]:
    """Server-sent events: the text as the worker generates it, then the finish and usage."""
    model = model_label(settings)
    async with client.pubsub() as pubsub:
        # Subscribe before enqueueing so that not one delta is missed.
        await pubsub.subscribe(stream_channel(job.id))
        try:
            job_id = await _submit(celery, job, sync_client, queue)
        except ApiError as error:
            yield _sse(error_body(error.message, error.kind))
            return
        yield _sse(chunk_body(job_id, model, {"role": "assistant", "content": ""}))
        sent = ""
        reply_task = asyncio.create_task(await_reply(client, job_id, settings.job_timeout))
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message is None:
                    if reply_task.done():
                        break  # every delta was published before the reply was stored
                    continue
                kind, text = decode_event(message["data"])
                if kind == "end":
                    break  # the whole text is here; the reply is being stored
                if kind == "delta":
                    text = text if sent else text.lstrip()
                    if text:
                        sent += text
                        yield _sse(chunk_body(job_id, model, {"content": text}))
            reply = await reply_task
        except (JobTimeoutError, JobFailedError) as error:
            yield _sse(error_body(str(error), "server_error"))
            return
        except aioredis.RedisError:
            yield _sse(error_body("the queue became unavailable", "server_error"))
            return
        finally:
            reply_task.cancel()
    # Deltas never published (a duplicate request, a fallback answer) still reach the client.
    if reply.text.startswith(sent) and reply.text != sent:
        yield _sse(chunk_body(job_id, model, {"content": reply.text[len(sent) :]}))
    usage = {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }
    finish = "length" if reply.finish_reason == "length" else "stop"
    yield _sse(chunk_body(job_id, model, {}, finish, usage))
    yield _sse("[DONE]")


__all__ = ["ApiError", "HttpChannel", "RequestTooLargeError", "body_limit", "router"]
