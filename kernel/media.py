"""Fetching MMS media for helpers: with Twilio's auth, a timeout, and size and type limits."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from kernel.contract import MediaRef

if TYPE_CHECKING:  # the helper SDK re-exports this module: it stays light to import
    from kernel.settings import Settings

ALLOWED_MEDIA_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/gif", "image/webp", "image/heic", "text/plain",
     "text/vcard", "application/pdf"}
)  # fmt: skip


# Where Twilio serves MMS media (it then redirects to its storage host, without our auth).
TWILIO_MEDIA_ORIGIN = ("https", "api.twilio.com", 443)


class MediaRefusedError(ValueError):
    """The media is of a type or size we do not fetch; the message says which."""


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of `url`, the port filled in for http and https."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"https": 443, "http": 80}.get(scheme)
    except ValueError:  # a port out of range or not a number
        return scheme, "", None
    return scheme, (parts.hostname or "").lower(), port


def media_origins(settings: Settings) -> frozenset[tuple[str, str, int | None]]:
    """The origins media is fetched from: Twilio's media host, and the configured
    GPT4P_TWILIO_API_BASE (scheme, host and port: a local recorder in tests)."""
    return frozenset({TWILIO_MEDIA_ORIGIN, _origin(settings.twilio_api_base)})


def fetch_media(ref: MediaRef, settings: Settings) -> bytes:
    """Download one MMS attachment from Twilio, refusing disallowed types and oversized files."""
    import httpx  # here, not at the top: importing the helper SDK must not load an HTTP client

    declared = ref.content_type.split(";")[0].strip().lower()
    if declared not in ALLOWED_MEDIA_TYPES:
        raise MediaRefusedError(f"media type {declared or 'unknown'} is not accepted")
    # Our Twilio credentials go with the request: only to Twilio (or the configured base).
    if _origin(ref.url) not in media_origins(settings):
        raise MediaRefusedError("media from that host is not accepted (only from Twilio's)")
    if settings.twilio_account_sid is None or settings.twilio_auth_token is None:
        raise MediaRefusedError("set GPT4P_TWILIO_ACCOUNT_SID and GPT4P_TWILIO_AUTH_TOKEN")
    auth = (settings.twilio_account_sid, settings.twilio_auth_token.get_secret_value())
    limit = settings.sms_media_max_bytes
    # Twilio redirects media to a storage host; httpx drops the credentials on that hop.
    with (
        httpx.Client(auth=auth, timeout=settings.twilio_timeout, follow_redirects=True) as client,
        client.stream("GET", ref.url) as response,
    ):
        response.raise_for_status()
        actual = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if actual and actual not in ALLOWED_MEDIA_TYPES:
            raise MediaRefusedError(f"media type {actual} is not accepted")
        if int(response.headers.get("content-length") or 0) > limit:
            raise MediaRefusedError(f"media is larger than {limit} bytes")
        data = bytearray()
        for chunk in response.iter_bytes():
            data.extend(chunk)
            if len(data) > limit:
                raise MediaRefusedError(f"media is larger than {limit} bytes")
    return bytes(data)
