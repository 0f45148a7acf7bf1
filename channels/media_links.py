"""Pictures sent back by link: a helper's image kept in Redis for minutes and served at
``GET /media/<token>`` under GPT4P_PUBLIC_URL, for Twilio (MMS, WhatsApp) and Telegram to fetch.

The token is 32 random bytes (`secrets.token_urlsafe`), never derived from the job, the
number or the picture: the link itself is the only credential, so the route asks for no
API key (Twilio and Telegram fetch it without one). Nothing in the URL is trusted data
(the token only names a Redis key), so there is nothing for a signature to protect: an
HMAC over a random token would add no secrecy and only a way to refuse a forged token
before the Redis lookup, which the token's shape check already does cheaply.

A picture is served for GPT4P_MEDIA_TTL seconds, as often as asked, not once: Twilio
fetches a MediaUrl again when its first fetch fails or times out, and for WhatsApp it
fetches separately from the send; a link that worked once would leave those without the
picture. Redis deletes the key when the TTL ends; after that the link is a 404.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

if TYPE_CHECKING:
    from kernel.contract import Reply
    from kernel.settings import Settings

log = logging.getLogger(__name__)

MEDIA_PREFIX = "gpt4p:media:"  # hash per picture: type -> content type, data -> its bytes
# secrets.token_urlsafe(32): 32 random bytes, 43 URL-safe base64 characters.
TOKEN_BYTES = 32
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
# The types every channel that carries pictures takes (Twilio MMS and WhatsApp, Telegram).
PICTURE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}


class PictureRefusedError(ValueError):
    """A picture that is not published: too large, not a picture we send, or no public URL."""


def sniffed_type(data: bytes) -> str | None:
    """The picture type `data` is by its first bytes (its magic), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def media_key(token: str) -> str:
    """The Redis hash holding the picture published under `token`."""
    return MEDIA_PREFIX + token


def publish(redis: Any, settings: Settings, data: bytes, content_type: str) -> str:
    """Keep `data` for GPT4P_MEDIA_TTL seconds; return its absolute ``/media/<token>`` URL.

    `redis` is a synchronous client (a delivery worker's). Raises `PictureRefusedError`
    for a picture over GPT4P_MEDIA_MAX_BYTES, of a type other than PNG, JPEG, GIF or
    WebP (checked by its bytes, which must agree with `content_type`), or when
    GPT4P_PUBLIC_URL is not set (Twilio could not reach the link).
    """
    if not settings.public_url:
        raise PictureRefusedError("set GPT4P_PUBLIC_URL to send pictures back")
    if len(data) > settings.media_max_bytes:
        raise PictureRefusedError(f"the picture is larger than {settings.media_max_bytes} bytes")
    declared = content_type.split(";")[0].strip().lower()
    declared = _ALIASES.get(declared, declared)
    actual = sniffed_type(data)
    if actual is None or declared != actual:
        raise PictureRefusedError(f"not a picture we send ({declared or 'no type'})")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    key = media_key(token)
    with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={"type": actual, "data": data})
        pipe.expire(key, settings.media_ttl)
        pipe.execute()
    return f"{settings.public_url.rstrip('/')}/media/{token}"


def image_of(reply: Reply) -> tuple[bytes, str] | None:
    """The helper's picture `reply` carries (its bytes and type), or None.

    A helper's image reaches a Reply's context (``image_base64``, ``image_type``) only
    for a channel that carries pictures (`kernel.channels`); one that does not decode
    is logged and left out, so the text still goes.
    """
    encoded, kind = reply.context.get("image_base64"), reply.context.get("image_type", "")
    if not encoded or not kind.startswith("image/"):
        return None
    try:
        return base64.b64decode(encoded, validate=True), kind
    except (binascii.Error, ValueError):
        log.warning("reply %s: its picture is not valid base64; sent without", reply.job_id)
        return None


def picture_link(
    redis: Any, settings: Settings, reply: Reply, channel_max_bytes: int
) -> str | None:
    """The published link to `reply`'s picture, for a channel taking at most
    `channel_max_bytes`; None when it has none, or (logged) when it cannot go: the text
    then goes alone. Redis errors are raised (the send is retried)."""
    picture = image_of(reply)
    if picture is None:
        return None
    data, kind = picture
    if len(data) > channel_max_bytes:
        log.warning("reply %s: its picture (%d bytes) is over the %s limit of %d; text alone",
                    reply.job_id, len(data), reply.channel, channel_max_bytes)  # fmt: skip
        return None
    try:
        return publish(redis, settings, data, kind)
    except PictureRefusedError as error:
        log.warning("reply %s: its picture is not sent (%s); text alone", reply.job_id, error)
        return None


router = APIRouter()


@router.api_route("/media/{token}", methods=["GET", "HEAD"], include_in_schema=False)
async def media(token: str, request: Request) -> Response:
    """A published picture, with its type; 404 once it expired or for a token never issued."""
    if not _TOKEN_RE.match(token):
        raise HTTPException(status_code=404, detail="no such picture")
    try:
        kind, data = await request.app.state.redis.hmget(media_key(token), "type", "data")
    except aioredis.RedisError as error:
        log.warning("picture not served: Redis unreachable (%s)", error.__class__.__name__)
        raise HTTPException(status_code=503, detail="try again later") from error
    if kind is None or data is None:
        raise HTTPException(status_code=404, detail="no such picture")
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    return Response(content=bytes(data), media_type=kind.decode(), headers=headers)
