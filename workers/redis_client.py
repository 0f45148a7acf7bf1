"""How every GPT4People process connects to Redis: one server, or the primary Sentinels watch.

For a Sentinel URL (see `workers.redis_urls`), ``GPT4P_REDIS_MASTER_NAME``
names the monitored primary and ``GPT4P_REDIS_SENTINEL_PASSWORD`` is the
Sentinels' own password, if they have one. Clients made here, and Celery's
broker and result backend (configured with `celery_transport_options`), ask
the Sentinels where the primary is and ask again after a connection fails, so
each follows a failover by itself.
"""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel

from workers.redis_urls import is_sentinel_url, parse_sentinel_url
from workers.settings import Settings, get_settings

# A Sentinel answers "where is the primary?" in a millisecond; one whose host is gone
# must be skipped for the next quickly, not after the kernel's two-minute connect timeout
# (redis-py gives Sentinels no timeout at all once sentinel_kwargs are set).
SENTINEL_TIMEOUT_S = 2.0


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to talk to the Sentinels themselves: timeouts, and their password if any."""
    options: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S,
                               "socket_connect_timeout": SENTINEL_TIMEOUT_S}  # fmt: skip
    if settings.redis_sentinel_password is not None:
        options["password"] = settings.redis_sentinel_password.get_secret_value()
    return options


def celery_transport_options(url: str, settings: Settings) -> dict[str, Any]:
    """What Celery's broker and result backend need beyond the URL (the Sentinel options)."""
    if not is_sentinel_url(url):
        return {}
    return {"master_name": settings.redis_master_name,
            "sentinel_kwargs": _sentinel_kwargs(settings)}  # fmt: skip


def _sentinel_primary(
    url: str, settings: Settings | None, options: dict[str, Any], asynchronous: bool
) -> Any:
    """A client (sync or asyncio) of the primary the Sentinels of `url` name, found anew
    after each failed connection."""
    settings = settings or get_settings()
    target = parse_sentinel_url(url)
    kind = async_sentinel.Sentinel if asynchronous else redis.sentinel.Sentinel
    manager = kind(target.sentinels, sentinel_kwargs=_sentinel_kwargs(settings), **options)
    login = {"username": target.username, "password": target.password}
    primary_options = {**options, "db": target.db,
                       **{k: v for k, v in login.items() if v is not None}}  # fmt: skip
    return manager.master_for(settings.redis_master_name, **primary_options)


def redis_client(url: str, settings: Settings | None = None, **options: Any) -> redis.Redis:
    """A (thread-safe, pooled) client of the Redis at `url`; of the current primary for
    a Sentinel URL. `options` are redis-py connection options (timeouts)."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    return cast(redis.Redis, _sentinel_primary(url, settings, options, asynchronous=False))


def async_redis_client(
    url: str, settings: Settings | None = None, **options: Any
) -> aioredis.Redis:
    """`redis_client` for asyncio code (the web app)."""
    if not is_sentinel_url(url):
        return aioredis.Redis.from_url(url, **options)
    return cast(aioredis.Redis, _sentinel_primary(url, settings, options, asynchronous=True))


def _sentinels_of(client: redis.Redis | aioredis.Redis) -> list[Any]:
    """The Sentinel clients behind a client from a Sentinel URL (none for a plain one)."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    return list(getattr(manager, "sentinels", []))


def close_redis(client: redis.Redis) -> None:
    """Close `client` and, for a Sentinel URL, its connections to the Sentinels."""
    client.close()
    for sentinel in _sentinels_of(client):
        sentinel.close()


async def aclose_redis(client: aioredis.Redis) -> None:
    """`close_redis` for an asyncio client."""
    await client.aclose()
    for sentinel in _sentinels_of(client):
        await sentinel.aclose()
