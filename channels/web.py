"""The web app: wires the channels' routes, health checks and error handling. No logic here.

Run it with ``uvicorn channels.web:create_app --factory`` (``gpt4people up`` does).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from channels.http.api import ApiError, body_limit, text_allowance
from channels.http.api import router as openai_router
from channels.http.guard import (
    CALLER_SCOPE_KEY,
    ApiKeyGuard,
    ApiKeys,
    BodyLimit,
    BodyTooLargeError,
    SafeErrors,
)
from channels.http.openai_schema import error_body
from channels.media_links import router as media_router
from channels.sms.spool import InboundSpool
from channels.sms.webhook import drain_spool, sync_redis_for
from channels.telegram.webhook import drain_spool as drain_telegram_spool
from kernel.channels import webhook_channels
from kernel.metrics import RedisCollector
from kernel.redis_client import aclose_redis, async_redis_client, close_redis, resolve_redis_url
from kernel.settings import Settings, get_settings
from workers.app import celery_for
from workers.liveness import live_workers

log = logging.getLogger(__name__)


def _where(item: dict[str, Any]) -> str:
    return ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"


def _describe(error: RequestValidationError) -> str:
    # Where and what only: pydantic's "input" (the caller's own data) is never echoed or logged.
    problems = [f"{_where(item)}: {item.get('msg', 'invalid')}" for item in error.errors()[:5]]
    return "invalid request: " + "; ".join(problems)


SPOOL_DRAIN_INTERVAL_S = 1.0


async def _drain_forever(app: FastAPI) -> None:
    """Move messages spooled during a Redis outage into Redis once it answers again."""
    state = app.state
    while True:
        await asyncio.sleep(SPOOL_DRAIN_INTERVAL_S)
        try:
            waiting = len(state.spool)
        except Exception as error:  # noqa: BLE001 - the drainer outlives any one failure
            log.warning("spool unreadable (%s); retrying", error.__class__.__name__)
            continue
        if not waiting:
            continue
        # Each drain hands over its own kinds (Twilio's; Telegram's) and leaves the rest; one
        # failing never keeps the other from running.
        for drain in (drain_spool, drain_telegram_spool):
            try:
                await asyncio.to_thread(
                    drain, state.spool, state.settings, state.sync_redis, state.celery
                )
            except Exception as error:  # noqa: BLE001 - the drainer outlives any one failure
                log.warning("spool drain failed (%s); retrying", error.__class__.__name__)


def channel_routers() -> list[APIRouter]:
    """Every registered channel's webhook router (kernel.channels), by the convention
    ``channels.<name>.webhook.router``; each must serve its channel's route."""
    routers = []
    for facts in webhook_channels():
        router = importlib.import_module(f"channels.{facts.name}.webhook").router
        if facts.route not in {getattr(route, "path", None) for route in router.routes}:
            raise RuntimeError(f"channels.{facts.name}.webhook.router does not serve "
                               f"{facts.route}, the route kernel.channels registers")  # fmt: skip
        routers.append(router)
    return routers


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application with every registered channel's webhook (kernel.channels)."""
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
    for router in channel_routers():
        app.include_router(router)
    app.include_router(media_router)  # GET /media/<token>: pictures sent back
    _add_guards(app, settings)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(BodyTooLargeError)
    async def _too_large(_: Request, error: BodyTooLargeError) -> JSONResponse:
        body = error_body(str(error.detail), code="request_too_large")
        return JSONResponse(body, status_code=413)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        body = error_body(_describe(error), param=_where(first))
        return JSONResponse(body, status_code=400)

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
        """Readiness: Redis answers and at least one inference worker is alive.

        The details (Redis, worker hostnames) only for a caller with the API key, when
        keys are set; anyone else learns ready or not."""
        detailed = request.scope.get(CALLER_SCOPE_KEY) is not None
        try:
            await request.app.state.redis.ping()
            workers = await asyncio.to_thread(live_workers, request.app.state.sync_redis)
        except (aioredis.RedisError, redis.RedisError) as error:
            log.warning("not ready: Redis unreachable (%s)", error.__class__.__name__)
            down = {"status": "unavailable", "redis": "down"}
            return JSONResponse(down if detailed else {"status": "unavailable"}, status_code=503)
        status = "ok" if workers else "unavailable"
        body: dict[str, Any] = {"status": status, "redis": "up", "workers": workers}
        return JSONResponse(body if detailed else {"status": status},
                            status_code=200 if workers else 503)  # fmt: skip

    return app


def _add_guards(app: FastAPI, settings: Settings) -> None:
    """CORS, the API key before any body is read, a byte limit on every body, no 500 with data.

    Starlette runs the middleware added last first: CORS (a preflight is answered there,
    without a key and without a body; every answer, a 401 or a 500 too, gets its headers
    so that a page can read it), then errors, then the key, then the limit."""
    private = {"/metrics"} if not settings.http_public_metrics else set()
    if not settings.http_public_docs:
        private |= {p for p in (app.docs_url, app.redoc_url, app.openapi_url) if p}
        private |= {f"{app.docs_url}/oauth2-redirect"} if app.docs_url else set()
    completions_limit = body_limit(settings)
    other_limit = (
        text_allowance(settings),
        f"the request body is larger than {text_allowance(settings)} bytes",
    )

    def protected(path: str) -> bool:
        return path.startswith("/v1/") or path == "/v1" or path in private

    def limit_for(path: str) -> tuple[int, str]:
        # Only chat completions carry inline images; every other body is small.
        return completions_limit if path == "/v1/chat/completions" else other_limit

    app.add_middleware(BodyLimit, limit_for=limit_for)
    keys = ApiKeys(settings)
    app.add_middleware(ApiKeyGuard, keys=keys, protected=protected)
    app.add_middleware(SafeErrors)
    if "*" in settings.http_cors_origins and not keys.configured:
        log.warning("GPT4P_HTTP_CORS_ORIGINS=* without an API key: any web page a user of this "
                    "machine opens can use the API; set GPT4P_HTTP_API_KEY or name the "
                    "origins")  # fmt: skip
    if settings.http_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.http_cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            # The key travels in Authorization, never in cookies: no credentials mode.
            allow_headers=["*"],
            max_age=600,
        )
