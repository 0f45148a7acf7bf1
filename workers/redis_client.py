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

from workers.redis_urls import SentinelTarget, is_sentinel_url, parse_sentinel_url
from workers.settings import Settings, get_settings


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    password = settings.redis_sentinel_password
    return {"password": password.get_secret_value()} if password is not None else {}


def celery_transport_options(url: str, settings: Settings) -> dict[str, Any]:
    """What Celery's broker and result backend need beyond the URL (the Sentinel options)."""
    if not is_sentinel_url(url):
        return {}
    return {"master_name": settings.redis_master_name,
            "sentinel_kwargs": _sentinel_kwargs(settings)}  # fmt: skip


def _sentinel_manager(
    target: SentinelTarget, settings: Settings, options: dict[str, Any], asynchronous: bool
) -> Any:
    # The Sentinels get the same timeouts as the primary, and their own password.
    timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel_kwargs = {**timeouts, **_sentinel_kwargs(settings)}
    kind = async_sentinel.Sentinel if asynchronous else redis.sentinel.Sentinel
    return kind(target.sentinels, sentinel_kwargs=sentinel_kwargs, **options)


def _primary_options(target: SentinelTarget, options: dict[str, Any]) -> dict[str, Any]:
    login = {"username": target.username, "password": target.password}
    return {**options, "db": target.db, **{k: v for k, v in login.items() if v is not None}}


def redis_client(url: str, settings: Settings | None = None, **options: Any) -> redis.Redis:
    """A (thread-safe, pooled) client of the Redis at `url`; of the current primary for
    a Sentinel URL. `options` are redis-py connection options (timeouts)."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    settings = settings or get_settings()
    target = parse_sentinel_url(url)
    manager = _sentinel_manager(target, settings, options, asynchronous=False)
    primary = manager.master_for(settings.redis_master_name, **_primary_options(target, options))
    return cast(redis.Redis, primary)


def async_redis_client(
    url: str, settings: Settings | None = None, **options: Any
) -> aioredis.Redis:
    """`redis_client` for asyncio code (the web app)."""
    if not is_sentinel_url(url):
        return aioredis.Redis.from_url(url, **options)
    settings = settings or get_settings()
    target = parse_sentinel_url(url)
    manager = _sentinel_manager(target, settings, options, asynchronous=True)
    primary = manager.master_for(settings.redis_master_name, **_primary_options(target, options))
    return cast(aioredis.Redis, primary)
