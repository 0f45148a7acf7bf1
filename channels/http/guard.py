"""Guards in front of the web app, as pure ASGI middleware: they act before a body is read.

FastAPI reads and parses a request's body before it runs the route's
dependencies, so neither an API key dependency nor a ``Content-Length`` check
can stop a client that sends a huge body (chunked, without a length) from
making the web process hold and parse all of it. These guards sit between the
server and the app:

* `ApiKeyGuard` checks the ``Authorization`` header of every request and
  answers 401 on a protected path before the app sees a byte of the body;
* `BodyLimit` counts the body's bytes as they arrive and stops at the limit
  with 413, whatever ``Content-Length`` says or does not say;
* `SafeErrors` turns anything unhandled into a 500 in OpenAI's error format and
  logs the exception's type and stack, never its message (a validation error's
  message quotes the request).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from channels.http.openai_schema import error_body
from kernel.settings import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# Where the guards leave what they learned for the routes (the ASGI scope of the request).
CALLER_SCOPE_KEY = "gpt4p.caller"
BODY_BYTES_SCOPE_KEY = "gpt4p.body_bytes"
OPEN_CALLER = "open"  # every caller, when no API key is configured


async def send_error(
    send: Send, status: int, message: str, kind: str, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Answer with an OpenAI-format error, without reading the request's body."""
    body = json.dumps(error_body(message, kind, code)).encode()
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def route_path(scope: Scope) -> str:
    """The path the app routes on: without the ``root_path`` a proxy mounts the app under
    (uvicorn's --root-path puts it in front of ``path``), so /api/metrics is /metrics."""
    path, root = str(scope["path"]), str(scope.get("root_path") or "")
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        return path[len(root.rstrip("/")) :] or "/"
    return path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class ApiKeys:
    """The configured API keys (GPT4P_HTTP_API_KEY and GPT4P_HTTP_API_KEYS) and who holds one."""

    def __init__(self, settings: Settings) -> None:
        keys = []
        if settings.http_api_key is not None:
            keys.append(settings.http_api_key.get_secret_value())
        if settings.http_api_keys is not None:
            keys.extend(settings.http_api_keys.get_secret_value().split(","))
        self._keys = [k.strip().encode() for k in keys if k.strip()]

    @property
    def configured(self) -> bool:
        """Whether any key is set (else every endpoint is open, as on a loopback install)."""
        return bool(self._keys)

    def caller(self, authorization: bytes | None) -> str | None:
        """The caller's id for a valid ``Bearer`` key, `OPEN_CALLER` without keys, else None.

        The id is a hash of the key: it scopes idempotency keys per key and never
        shows the key itself. Bytes are compared in constant time, whatever their
        encoding (a non-ASCII header is just a wrong key)."""
        if not self._keys:
            return OPEN_CALLER
        scheme, _, given = (authorization or b"").partition(b" ")
        given = given.strip()
        matched = None
        for key in self._keys:  # every key compared, so timing does not tell which matched
            if hmac.compare_digest(given, key) and scheme.lower() == b"bearer":
                matched = key
        if matched is None:
            return None
        return "key-" + hashlib.sha256(matched).hexdigest()[:16]


class ApiKeyGuard:
    """Answers 401 on a protected path without the API key, before the body is read.

    Every request gets its caller's id (or None) in ``scope["gpt4p.caller"]``, so
    open paths (``/readyz``) can say more to a caller who holds a key."""

    def __init__(self, app: App, keys: ApiKeys, protected: Callable[[str], bool]) -> None:
        self.app, self.keys, self.protected = app, keys, protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key, then hand the request on (or answer 401)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller = self.keys.caller(_header(scope, b"authorization"))
        scope[CALLER_SCOPE_KEY] = caller
        if caller is None and self.protected(route_path(scope)):
            await send_error(send, 401, "missing or wrong API key", "authentication_error",
                             "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip
            return
        await self.app(scope, receive, send)


class BodyTooLargeError(StarletteHTTPException):
    """The request's body went past its limit while it was being received."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class BodyLimit:
    """Counts a body's bytes as they are received and stops at the limit with 413.

    `limit_for(path)` gives the limit and the message that explains it. A declared
    ``Content-Length`` over the limit is refused before reading; a chunked body is
    read up to the limit, then the app's next read raises `BodyTooLargeError` (an
    HTTP 413 to FastAPI and Starlette), which this guard also answers if it
    escapes the app. The bytes received so far are kept in
    ``scope["gpt4p.body_bytes"]``."""

    def __init__(self, app: App, limit_for: Callable[[str], tuple[int, str]]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hand the request on with a counting `receive`."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message = self.limit_for(route_path(scope))
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await send_error(send, 413, message, "invalid_request_error", "request_too_large")
            return
        scope[BODY_BYTES_SCOPE_KEY] = 0
        started = False

        async def counting_receive() -> Message:
            if scope[BODY_BYTES_SCOPE_KEY] > limit:
                raise BodyTooLargeError(message)  # the app read on after the first refusal
            event = await receive()
            if event["type"] == "http.request":
                scope[BODY_BYTES_SCOPE_KEY] += len(event.get("body", b""))
                if scope[BODY_BYTES_SCOPE_KEY] > limit:
                    raise BodyTooLargeError(message)
            return event

        async def tracking_send(event: Message) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await send_error(send, 413, message, "invalid_request_error", "request_too_large")


class SafeErrors:
    """A 500 in OpenAI's format for anything unhandled, logged without request data.

    Starlette re-raises an unhandled exception after answering, so the server logs
    it with its message, and messages quote input (pydantic's ``input_value=...``).
    Here it is logged by type, route and stack frames only, and not re-raised."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; answer 500 if it raises before answering."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(event: Message) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001 - the last line of defence, logged below
            route = getattr(scope.get("route"), "path", "an unmatched path")
            frames = "".join(traceback.format_tb(error.__traceback__))
            log.error("unhandled %s in %s %s (message withheld: it may quote the request)\n%s",
                      type(error).__name__, scope.get("method"), route, frames)  # fmt: skip
            if not started:
                await send_error(send, 500, "internal error; the operator's log has the details",
                                 "server_error")  # fmt: skip


__all__ = [
    "BODY_BYTES_SCOPE_KEY",
    "CALLER_SCOPE_KEY",
    "OPEN_CALLER",
    "ApiKeyGuard",
    "ApiKeys",
    "BodyLimit",
    "BodyTooLargeError",
    "SafeErrors",
    "route_path",
    "send_error",
]
