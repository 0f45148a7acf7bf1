"""Redis URLs: a plain server or Celery's Sentinel form, validated, parsed and redacted.

``GPT4P_REDIS_URL`` takes a plain URL (``redis://``, ``rediss://``, ``unix://``)
or Celery's Sentinel form, ``sentinel://:pw@host1:26379;sentinel://:pw@host2:26379/0``:
the Sentinels to ask, the password of the Redis servers they watch, and the
database. The password and database may be given once, in the first part:
`check_redis_url` copies them into every part, because kombu reads each part
on its own when it moves on to the next Sentinel (a part without the password
would fail with NOAUTH during a failover). Pure functions: the settings
validate with them and `kernel.redis_client` connects with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import (
    parse_qsl,
    quote,
    unquote,
    unquote_plus,
    urlencode,
    urlsplit,
    urlunsplit,
)

SENTINEL_SCHEME = "sentinel://"
PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_SENTINEL_PORT = 26379
LOGIN_OPTIONS = ("username", "password")


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
    return _login_from_query(url)


def _login_from_query(url: str) -> str:
    """`url` with a ``?username=``/``?password=`` option moved into its login part.

    redis-py reads the query form, kombu (the broker) fails on it; in the login part
    every reader, and every masking of logs, finds it.
    """
    parts = urlsplit(url)
    options = parse_qsl(parts.query, keep_blank_values=True)
    login = {name.lower(): value for name, value in options
             if name.lower() in LOGIN_OPTIONS}  # fmt: skip
    if not login:
        return url
    if "@" in parts.netloc:
        raise InvalidRedisUrlError(
            "give the login once: redis://user:password@host, not also ?password="
        )
    user = quote(login.get("username", ""), safe="")
    password = login.get("password")
    userinfo = f"{user}:{quote(password, safe='')}@" if password is not None else f"{user}@"
    rest = [(name, value) for name, value in options if name.lower() not in LOGIN_OPTIONS]
    return urlunsplit((parts.scheme, userinfo + parts.netloc, parts.path, urlencode(rest),
                       parts.fragment))  # fmt: skip


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
# One ?name=value or &name=value of a query string.
_QUERY_OPTION = re.compile(r"([?&])([^=&#]*)=([^&#]*)")
# Option names that carry a secret: password=, sentinel_password=, ssl_password=, token=...
_SECRET_OPTION_NAME = re.compile(r"(?i)pass|pwd|secret|token|auth|cred")
# A URL inside free text (an error message, a log line): a scheme, then no spaces.
_URL_IN_TEXT = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+")
MASK = "***"
SHORTEST_SCRUBBED = 4  # shorter "secrets" would mask letters all over the text


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for logs (every Sentinel part too).

    Masked: the password of the userinfo (``:pw@``, ``user:pw@``, or a lone ``pw@``),
    and every query option whose name, once percent-decoded as redis-py decodes it,
    speaks of a secret (``?password=``, ``&Password=``, ``?pass%77ord=``,
    ``&sentinel_password=``).
    """
    parts = _PART_BOUNDARY.split(url) if is_sentinel_url(url) else [url]
    return ";".join(_redact_query(_redact_one(part)) for part in parts)


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (error messages quote the URL they failed on)."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def url_secrets(url: str) -> set[str]:
    """Every secret `url` carries, as written and percent-decoded, to scrub from any output."""
    found: set[str] = set()
    for part in _PART_BOUNDARY.split(url) if is_sentinel_url(url) else [url]:
        _, sep, rest = part.partition("://")
        if sep and "@" in rest:
            credentials = rest.rpartition("@")[0]
            found.add(credentials.split(":", 1)[1] if ":" in credentials else credentials)
        for match in _QUERY_OPTION.finditer(part):
            if _SECRET_OPTION_NAME.search(unquote_plus(match.group(2))):
                found.add(match.group(3))
    found |= {unquote_plus(secret) for secret in found} | {unquote(s) for s in found}
    return {secret for secret in found if len(secret) >= SHORTEST_SCRUBBED}


def scrub(text: str, secrets: set[str]) -> str:
    """`text` with its URLs redacted and every one of `secrets` replaced by ``***``."""
    text = redact_text(text)
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: no half-masked one
        text = text.replace(secret, MASK)
    return text


def _redact_query(url: str) -> str:
    def mask(match: re.Match[str]) -> str:
        if _SECRET_OPTION_NAME.search(unquote_plus(match.group(2))):
            return f"{match.group(1)}{match.group(2)}={MASK}"
        return match.group(0)

    return _QUERY_OPTION.sub(mask, url)


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    # The last "@": a password may hold a raw "@"; masking too much is the safe side.
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user}:{MASK}@{host}"
