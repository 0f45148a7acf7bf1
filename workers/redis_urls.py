"""Redis URLs: a plain server or Celery's Sentinel form, validated, parsed and redacted.

``GPT4P_REDIS_URL`` takes a plain URL (``redis://``, ``rediss://``, ``unix://``)
or Celery's Sentinel form, ``sentinel://:pw@host1:26379;sentinel://:pw@host2:26379/0``:
the Sentinels to ask, the password of the Redis servers they watch (the same
in every part, or given once), and the database. Pure functions: the settings
validate with them and `workers.redis_client` connects with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SENTINEL_SCHEME = "sentinel://"
PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_SENTINEL_PORT = 26379


class InvalidRedisUrlError(ValueError):
    """A Redis URL cannot be used; the message says why."""


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``sentinel://`` URL says: where the Sentinels are, and the primary's db and login."""

    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None


def is_sentinel_url(url: str) -> bool:
    """Whether `url` is Celery's Sentinel form (one or more ``sentinel://`` parts)."""
    return url.startswith(SENTINEL_SCHEME)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Split ``sentinel://:pw@h1:26379;sentinel://h2:26379/0`` into its parts.

    Celery and kombu take the login and database from the first part, so the
    others may repeat them or leave them out, but never differ.
    """
    sentinels: list[tuple[str, int]] = []
    first: tuple[int, str | None, str | None] | None = None
    for raw in url.split(";"):
        part = raw.strip()
        if not is_sentinel_url(part):
            raise InvalidRedisUrlError(
                f"every part of a Sentinel URL must start with {SENTINEL_SCHEME}"
            )
        parsed = urlsplit(part)
        try:
            port = parsed.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise InvalidRedisUrlError("a Sentinel URL part has an invalid port") from None
        if not parsed.hostname:
            raise InvalidRedisUrlError("a Sentinel URL part has no host")
        sentinels.append((parsed.hostname, port))
        path = parsed.path.strip("/")
        if path and not path.isdigit():
            raise InvalidRedisUrlError(f"the database must be a number, not {path!r}")
        login = (unquote(parsed.username) if parsed.username else None,
                 unquote(parsed.password) if parsed.password else None)  # fmt: skip
        if first is None:
            first = (int(path or 0), *login)
        elif (path and int(path) != first[0]) or any(
            given and given != kept for given, kept in zip(login, first[1:], strict=True)
        ):
            raise InvalidRedisUrlError(
                "the parts of a Sentinel URL name different databases or passwords "
                "(Celery uses the first part's)"
            )
    assert first is not None  # split() gives at least one part
    return SentinelTarget(sentinels, *first)


def check_redis_url(url: str) -> str:
    """`url` if GPT4People can use it, else raise `InvalidRedisUrlError`."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
    elif not url.startswith(PLAIN_SCHEMES):
        raise InvalidRedisUrlError("must start with redis://, rediss://, unix:// or sentinel://")
    return url


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for logs (every Sentinel part too)."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user}:***@{host}"
