"""``POST /telegram``: Telegram's webhook in, verified by its secret-token header.

Telegram sends each update with the ``X-Telegram-Bot-Api-Secret-Token`` header set
to the ``secret_token`` given to setWebhook (GPT4P_TELEGRAM_SECRET): anything else
is answered 403 before the body is read, nothing queued. The body is bounded
before it is parsed. The answer is an empty 200 at once (a method in the body would
be executed by Telegram: replies never go that way); the work is on the queue. While
Redis does not answer, the update is kept in the web app's spool (kind "telegram")
and handed over once Redis is back (`drain_spool`, called by channels.web).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sqlite3
from typing import Annotated, Any

import redis
from celery import Celery
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from channels.base import InvalidInboundError
from channels.sms.spool import InboundSpool
from channels.telegram.intake import TelegramChannel, described
from channels.telegram.state import TelegramState
from channels.telegram.updates import MAX_UPDATE_BYTES, parse_update
from kernel.redis_client import RedisUnavailableError
from kernel.settings import Settings

log = logging.getLogger(__name__)

SPOOL_KIND = "telegram"
router = APIRouter()


class UpdateTooLargeError(ValueError):
    """The body is larger than any update Telegram sends."""


def secret_matches(given: str | None, secret: str) -> bool:
    """Whether the header carries our secret (compared in constant time)."""
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


async def bounded_body(request: Request, limit: int = MAX_UPDATE_BYTES) -> bytes:
    """The request's body, refused (`UpdateTooLargeError`) as soon as it passes `limit`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UpdateTooLargeError
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise UpdateTooLargeError
    return bytes(body)


def _plain(text: str, status: int) -> Response:
    return Response(text, status_code=status, media_type="text/plain")


@router.post("/telegram", response_model=None)
async def telegram_webhook(
    request: Request,
    x_telegram_bot_api_secret_token: Annotated[str | None, Header()] = None,
) -> Response:
    """Telegram's webhook: one update per request."""
    state = request.app.state
    settings: Settings = state.settings
    if settings.telegram_bot_token is None or settings.telegram_secret is None:
        log.error("Telegram webhook called but GPT4P_TELEGRAM_BOT_TOKEN/SECRET are not set")
        return _plain("Telegram is not configured", 503)
    if not secret_matches(x_telegram_bot_api_secret_token,
                          settings.telegram_secret.get_secret_value()):  # fmt: skip
        log.warning("Telegram webhook refused: missing or wrong secret token")
        return _plain("forbidden", 403)
    try:
        update = parse_update(await bounded_body(request))
    except UpdateTooLargeError:
        return _plain(f"an update is at most {MAX_UPDATE_BYTES} bytes", 413)
    except InvalidInboundError as error:
        log.warning("Telegram webhook rejected: %s", error)
        return _plain(str(error), 400)
    if update.message is None:
        return _plain("ok", 200)  # a kind of update we do not handle: acknowledged
    channel = TelegramChannel(settings, TelegramState(state.sync_redis, settings), state.celery)
    try:
        outcome = await asyncio.to_thread(channel.receive_durably, update)
    except (RedisUnavailableError, redis.RedisError) as error:
        raw = update.model_dump_json(by_alias=True, exclude_none=True)
        try:
            await asyncio.to_thread(state.spool.put, SPOOL_KIND, {"update": raw})
        except (OSError, sqlite3.Error) as spool_error:
            log.error("Telegram %s lost: Redis (%s) and spool (%s) unavailable",
                      described(update), error.__class__.__name__, spool_error)  # fmt: skip
            return _plain("try again later", 503)  # Telegram retries a webhook that failed
        log.warning("Telegram %s spooled: Redis unavailable (%s)", described(update),
                    error.__class__.__name__)  # fmt: skip
        return _plain("ok", 200)
    log.info("Telegram %s: %s", described(update), outcome)
    return _plain("ok", 200)


def drain_spool(spool: InboundSpool, settings: Settings, client: Any, celery: Celery) -> int:
    """Hand spooled Telegram updates to Redis, oldest first; stop at the first Redis failure."""
    channel = TelegramChannel(settings, TelegramState(client, settings), celery)
    drained = 0
    for item_id, _, payload in spool.pending((SPOOL_KIND,)):
        try:
            update = parse_update(payload.get("update", ""))
            outcome = channel.receive_durably(update, replay=True)
        except (RedisUnavailableError, redis.RedisError):
            break
        except InvalidInboundError:
            outcome = "dropped (invalid)"
        spool.remove(item_id)
        drained += 1
        log.info("spooled Telegram update: %s", outcome)
    return drained
