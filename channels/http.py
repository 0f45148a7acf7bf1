"""The HTTP channel: an OpenAI-compatible ``/v1/chat/completions`` that goes through the queue."""

from __future__ import annotations

import asyncio
import hmac
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
from channels.openai_schema import (
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    error_body,
)
from workers.client import (
    JobFailedError,
    JobTimeoutError,
    await_reply,
    submit,
)
from workers.contract import INFERENCE_QUEUE, Job, Reply, model_queue
from workers.liveness import served_models
from workers.model_files import model_label
from workers.redis_server import RedisUnavailableError
from workers.settings import Settings
from workers.streaming import decode_event, stream_channel

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered in OpenAI's error format with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        """The JSON error response."""
        return JSONResponse(error_body(self.message, self.kind, self.code), status_code=self.status)


class HttpChannel:
    """Turns an OpenAI chat completions request into a job."""

    name = "http"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def to_job(self, inbound: object, idempotency_key: str | None = None) -> Job:
        """A job for a validated `ChatCompletionRequest`."""
        if not isinstance(inbound, ChatCompletionRequest):
            raise InvalidInboundError("expected a chat completions request")
        messages = [m.to_chat_message() for m in inbound.messages]
        size = sum(len(m.content) for m in messages)
        if size > self.settings.max_prompt_chars:
            raise InvalidInboundError(
                f"the messages are {size} characters long; the limit is "
                f"{self.settings.max_prompt_chars}"
            )
        media = inbound.messages[-1].media()[:10]
        if not messages[-1].content.strip() and not media:
            raise InvalidInboundError("the last user message is empty")
        return Job(
            channel=self.name,
            user=inbound.user or "api",
            messages=messages,
            options=inbound.options(),
            reply_to="http",
            media=media,
            idempotency_key=idempotency_key,
        )


def _state(request: Request) -> tuple[Settings, Celery, aioredis.Redis]:
    state = request.app.state
    return state.settings, state.celery, state.redis


def require_api_key(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Reject the request unless it carries GPT4P_HTTP_API_KEY (when one is set)."""
    settings: Settings = request.app.state.settings
    if settings.http_api_key is None:
        return
    expected = settings.http_api_key.get_secret_value()
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), expected):
        raise ApiError(401, "missing or wrong API key", "authentication_error", "invalid_api_key")


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
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    """Answer a chat completion through the queue, as JSON or as server-sent events."""
    settings, celery, client = _state(request)
    try:
        job = HttpChannel(settings).to_job(body, idempotency_key)
    except InvalidInboundError as error:
        raise ApiError(400, str(error), "invalid_request_error") from None
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


__all__ = ["ApiError", "HttpChannel", "router"]
