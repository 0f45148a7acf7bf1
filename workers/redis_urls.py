"""Redis URLs: a plain server or Celery's Sentinel form, validated, parsed and redacted.

``GPT4P_REDIS_URL`` takes a plain URL (``redis://``, ``rediss://``, ``unix://``)
or Celery's Sentinel form, ``sentinel://:pw@host1:26379;sentinel://:pw@host2:26379/0``:
the Sentinels to ask, the password of the Redis servers they watch, and the
database. The password and database may be given once, in the first part:
`check_redis_url` copies them into every part, because kombu reads each part
on its own when it moves on to the next Sentinel (a part without the password
would fail with NOAUTH during a failover). Pure functions: the settings
validate with them and `workers.redis_client` connects with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

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
    """Split ``sentinel://:pw@h1:26379/0;sentinel://h2:26379`` into its parts.

    The login and database are the first part's; the others may repeat them or
    leave them out, but never differ. Query options are refused rather than
    silently dropped (TLS to the Sentinels is not supported).
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
        if parsed.query or parsed.fragment:
            raise InvalidRedisUrlError("a Sentinel URL takes no ?options")
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
    """`url` if GPT4People can use it (a Sentinel URL with its login and database in every
    part), else raise `InvalidRedisUrlError`."""
    if is_sentinel_url(url):
        return sentinel_url(parse_sentinel_url(url))
    if not url.startswith(PLAIN_SCHEMES):
        raise InvalidRedisUrlError("must start with redis://, rediss://, unix:// or sentinel://")
    return url


def sentinel_url(target: SentinelTarget) -> str:
    """The Sentinel URL of `target`, every part with the login and the database."""
    user = quote(target.username or "", safe="")
    login = f"{user}:{quote(target.password, safe='')}@" if target.password else (
        f"{user}@" if user else ""
    )  # fmt: skip
    return ";".join(f"{SENTINEL_SCHEME}{login}{_bracketed(host)}:{port}/{target.db}"
                    for host, port in target.sentinels)  # fmt: skip


def _bracketed(host: str) -> str:
    """An IPv6 address in a URL's brackets (`urlsplit` gives it without them)."""
    return f"[{host}]" if ":" in host else host


# A new Sentinel part begins at ";sentinel://": a ";" inside a password does not split it.
_PART_BOUNDARY = re.compile(r";(?=\s*sentinel://)")
_PASSWORD_OPTION = re.compile(r"(?i)([?&]password=)[^&#]*")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for logs (every Sentinel part too)."""
    parts = _PART_BOUNDARY.split(url) if is_sentinel_url(url) else [url]
    return ";".join(_PASSWORD_OPTION.sub(r"\1***", _redact_one(part)) for part in parts)


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user}:***@{host}"
