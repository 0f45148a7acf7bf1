"""The web app: wires the channels' routes, health checks and error handling. No logic here.

Run it with ``uvicorn channels.web:create_app --factory`` (``gpt4people up`` does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from channels.http import ApiError
from channels.http import router as openai_router
from channels.openai_schema import error_body
from channels.sms import drain_spool, sync_redis_for
from channels.sms import router as sms_router
from channels.spool import InboundSpool
from workers.app import celery_for
from workers.liveness import live_workers
from workers.metrics import RedisCollector
from workers.redis_client import aclose_redis, async_redis_client, close_redis
from workers.redis_server import resolve_redis_url
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _describe(error: RequestValidationError) -> str:
    problems = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        problems.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems)


SPOOL_DRAIN_INTERVAL_S = 1.0


async def _drain_forever(app: FastAPI) -> None:
    """Move messages spooled during a Redis outage into Redis once it answers again."""
    state = app.state
    while True:
        await asyncio.sleep(SPOOL_DRAIN_INTERVAL_S)
        try:
            if len(state.spool):
                await asyncio.to_thread(
                    drain_spool, state.spool, state.settings, state.sync_redis, state.celery
                )
        except Exception as error:  # noqa: BLE001 - the drainer must outlive any one failure
            log.warning("spool drain failed (%s); retrying", error.__class__.__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application with every configured channel."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = resolve_redis_url(settings)
        app.state.redis = async_redis_client(
            url, settings, socket_connect_timeout=5, health_check_interval=30
        )
        app.state.sync_redis = sync_redis_for(url, settings)
        app.state.spool = InboundSpool(settings.state_dir / "spool.sqlite3")
        drainer = asyncio.create_task(_drain_forever(app))
        try:
            yield
        finally:
            drainer.cancel()
            await aclose_redis(app.state.redis)  # and its Sentinel connections, if any
            close_redis(app.state.sync_redis)
            app.state.spool.close()

    app = FastAPI(title="GPT4People", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.celery = celery_for(settings)
    app.include_router(openai_router)
    app.include_router(sms_router)

    # Refuse a body far past any prompt we would accept before reading it into memory.
    max_body = settings.max_prompt_chars * 4 + 64 * 1024

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > max_body:
            message = f"the request body is larger than {max_body} bytes"
            return JSONResponse(error_body(message), status_code=413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_describe(error)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(error.detail)), status_code=error.status_code, headers=error.headers
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the web process answers."""
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of every process, recorded in Redis."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RedisCollector(request.app.state.sync_redis))
        try:
            body = await asyncio.to_thread(generate_latest, registry)
        except redis.RedisError:
            return Response("# Redis unavailable\n", status_code=503, media_type="text/plain")
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: Redis answers and at least one inference worker is alive."""
        try:
            await request.app.state.redis.ping()
            workers = await asyncio.to_thread(live_workers, request.app.state.sync_redis)
        except (aioredis.RedisError, redis.RedisError) as error:
            log.warning("not ready: Redis unreachable (%s)", error.__class__.__name__)
            return JSONResponse({"status": "unavailable", "redis": "down"}, status_code=503)
        body = {"status": "ok" if workers else "unavailable", "redis": "up", "workers": workers}
        return JSONResponse(body, status_code=200 if workers else 503)

    return app
