"""How every GPT4People process finds and connects to Redis: one server, or the primary
Sentinels watch; GPT4P_REDIS_URL, else the embedded Redis a running `gpt4people up` started.

For a Sentinel URL (see `kernel.redis_urls`), ``GPT4P_REDIS_MASTER_NAME``
names the monitored primary and ``GPT4P_REDIS_SENTINEL_PASSWORD`` is the
Sentinels' own password, if they have one. Clients made here, and Celery's
broker and result backend (configured with `celery_transport_options`), ask
the Sentinels where the primary is and ask again after a connection fails, so
each follows a failover by itself.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel

from kernel.redis_urls import is_sentinel_url, parse_sentinel_url, redact_text, redact_url
from kernel.settings import Settings, get_settings

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


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
RUNTIME_FILE_NAME = "redis.url"


class RedisUnavailableError(RuntimeError):
    """Redis could not be reached (or started) in time; the message says where and why."""


def ping(url: str, timeout: float = 2.0) -> None:
    """Raise `RedisUnavailableError` unless the Redis at `url` answers PING within `timeout`."""
    client = redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as error:
        raise RedisUnavailableError(
            f"Redis at {redact_url(url)} is unreachable "
            f"({error.__class__.__name__}: {redact_text(str(error))})"
        ) from None
    finally:
        client.close()


def runtime_file(settings: Settings) -> Path:
    """Where `gpt4people up` records the URL of the Redis it started."""
    return settings.state_dir / RUNTIME_FILE_NAME


def write_runtime_url(settings: Settings, url: str) -> None:
    """Record the embedded Redis URL for other commands (readable by this user only)."""
    path = runtime_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    # Created 0600, not chmod-ed after: the URL holds the password from the first byte.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(f"{url}\n{os.getpid()}\n")
    tmp.replace(path)


def remove_runtime_url(settings: Settings) -> None:
    """Forget the embedded Redis URL, if it is ours."""
    path = runtime_file(settings)
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        if int(path.read_text(encoding="utf-8").split()[1]) == os.getpid():
            path.unlink()


def _runtime_url(settings: Settings) -> str | None:
    try:
        url, pid = runtime_file(settings).read_text(encoding="utf-8").split()[:2]
        if not _alive(int(pid)):  # a file left by a killed `up` is stale
            return None
    except (FileNotFoundError, ValueError):
        return None
    return url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, but another user's
    return True


def running_up_pid(settings: Settings) -> int | None:
    """The pid of a `gpt4people up` that runs an embedded Redis for this state folder."""
    try:
        pid = int(runtime_file(settings).read_text(encoding="utf-8").split()[1])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def resolve_redis_url(settings: Settings) -> str:
    """GPT4P_REDIS_URL, else the Redis a running `gpt4people up` started, else localhost:6379."""
    return settings.redis_url or _runtime_url(settings) or DEFAULT_REDIS_URL
