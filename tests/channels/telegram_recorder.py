"""A local stand-in for the part of Telegram's Bot API we use, recording every call.

Telegram's servers are out of reach of the tests; every process is pointed here with
GPT4P_TELEGRAM_API_BASE. It speaks the same protocol: methods at
``/bot<token>/<method>`` taking JSON, a form or a multipart upload and answering
``{"ok": true, "result": ...}`` or Telegram's error body (with ``retry_after`` for a
429); files at ``/file/bot<token>/<file_path>``; getUpdates long-polling a queue the
test fills, an offset confirming (dropping) the updates before it. It can be told to
fail the next sends to a chat, or to take a send and never answer it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

_update_ids = itertools.count(700_000)
_message_ids = itertools.count(1)


@dataclass
class Call:
    """One send the client made (sendMessage or sendPhoto), and how it was answered."""

    method: str
    chat: int
    text: str
    status: int
    photo: bytes | None = None
    photo_type: str = ""


@dataclass
class TelegramRecorder:
    """What Telegram would have received, scripted failures, and the updates to serve."""

    token: str
    url: str = ""
    calls: list[Call] = field(default_factory=list)
    failures: dict[int, list[tuple[int, int | None]]] = field(default_factory=dict)
    hang: set[int] = field(default_factory=set)  # chats whose next send is taken, unanswered
    release: threading.Event = field(default_factory=threading.Event)
    updates: list[dict[str, Any]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each getUpdates' offset, in order
    webhook_url: str = ""
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # file_id -> path, bytes
    file_requests: list[str] = field(default_factory=list)  # file_ids asked of getFile
    lock: threading.Condition = field(default_factory=threading.Condition)

    def settings(self) -> dict[str, str]:
        """The `base_env` settings of a process talking to this recorder as the bot."""
        return {"telegram_bot_token": self.token, "telegram_api_base": self.url}

    def fail(self, chat: int, *answers: tuple[int, int | None]) -> None:
        """Answer the next sends to `chat` with these (HTTP status, retry_after)s; 200 sends."""
        with self.lock:
            self.failures[chat] = list(answers)

    def attempts(self, chat: int) -> list[Call]:
        """Every send attempted to `chat`."""
        with self.lock:
            return [c for c in self.calls if c.chat == chat]

    def delivered(self, chat: int) -> list[str]:
        """The texts (and captions) Telegram accepted for `chat`, in order."""
        return [c.text for c in self.attempts(chat) if c.status == 200]

    def photos(self, chat: int) -> list[Call]:
        """The pictures Telegram accepted for `chat`."""
        return [c for c in self.attempts(chat) if c.status == 200 and c.photo is not None]

    def push(self, update: dict[str, Any]) -> None:
        """Serve `update` to the next getUpdates."""
        with self.lock:
            self.updates.append(update)
            self.lock.notify_all()

    def add_file(self, file_id: str, data: bytes) -> None:
        """Keep a photo someone sent, for getFile and its download."""
        with self.lock:
            self.files[file_id] = (f"photos/{file_id}.jpg", data)


def update(
    chat: int, text: str | None = None, *, update_id: int | None = None, **message: Any
) -> dict[str, Any]:
    """The update Telegram sends when the person of private chat `chat` writes `text`."""
    body: dict[str, Any] = {
        "message_id": next(_message_ids), "date": int(time.time()),
        "chat": {"id": chat, "type": "private", "first_name": "Test"},
        "from": {"id": chat, "is_bot": False, "first_name": "Test"},
        **({"text": text} if text is not None else {}), **message,
    }  # fmt: skip
    return {"update_id": update_id if update_id is not None else next(_update_ids),
            "message": body}  # fmt: skip


def _form(content_type: str, body: bytes) -> tuple[dict[str, Any], tuple[bytes, str] | None]:
    """The fields of a JSON, form or multipart request body, and an uploaded photo."""
    if content_type.startswith("application/json"):
        return (json.loads(body) if body else {}), None
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        fields: dict[str, Any] = {}
        photo = None
        for part in message.iter_parts():  # type: ignore[attr-defined]
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if part.get_filename():
                photo = (payload, part.get_content_type())
            else:
                fields[name] = payload.decode()
        return fields, photo
    return {k: v[0] for k, v in parse_qs(body.decode()).items()}, None


def _handler(recorder: TelegramRecorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, description: str, retry_after: int | None = None) -> None:
            body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
            if retry_after is not None:
                body["parameters"] = {"retry_after": retry_after}
            self._json(status, body)

        def do_GET(self) -> None:
            prefix = f"/file/bot{recorder.token}/"
            if not self.path.startswith(prefix):
                self._error(404, "Not Found")
                return
            wanted = self.path[len(prefix) :]
            with recorder.lock:
                found = [data for path, data in recorder.files.values() if path == wanted]
            if not found:
                self._error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(found[0])))
            self.end_headers()
            self.wfile.write(found[0])

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            fields, photo = _form(self.headers.get("Content-Type", ""), self.rfile.read(length))
            prefix = f"/bot{recorder.token}/"
            if not self.path.startswith(prefix):
                self._error(401, "Unauthorized")
                return
            method = self.path[len(prefix) :]
            if method in ("sendMessage", "sendPhoto"):
                self._send(method, fields, photo)
            elif method == "getUpdates":
                self._updates(fields)
            elif method == "getFile":
                self._file(str(fields.get("file_id", "")))
            elif method == "getWebhookInfo":
                self._json(200, {"ok": True, "result": {"url": recorder.webhook_url,
                                                        "pending_update_count": 0}})  # fmt: skip
            elif method == "deleteWebhook":
                recorder.webhook_url = ""
                self._json(200, {"ok": True, "result": True})
            else:
                self._error(404, "Not Found: method not found")

        def _send(self, method: str, fields: dict[str, Any], photo: Any) -> None:
            chat = int(fields.get("chat_id", 0))
            text = str(fields.get("text", fields.get("caption", "")))
            with recorder.lock:
                scripted = recorder.failures.get(chat, [])
                status, retry_after = scripted.pop(0) if scripted else (200, None)
                recorder.calls.append(Call(method, chat, text, status,
                                           photo[0] if photo else None,
                                           photo[1] if photo else ""))  # fmt: skip
                hang = chat in recorder.hang
                recorder.hang.discard(chat)
            if hang:  # taken (recorded), but the answer never comes in time
                recorder.release.wait(60)
                return
            if status == 429:
                self._error(429, f"Too Many Requests: retry after {retry_after}", retry_after)
            elif status == 403:
                self._error(403, "Forbidden: bot was blocked by the user")
            elif status != 200:
                self._error(status, "Bad Request: scripted failure")
            else:
                self._json(200, {"ok": True, "result": {"message_id": next(_message_ids),
                                                        "chat": {"id": chat}}})  # fmt: skip

        def _updates(self, fields: dict[str, Any]) -> None:
            offset = int(fields.get("offset", 0))
            deadline = time.monotonic() + min(float(fields.get("timeout", 0)), 50)
            with recorder.lock:
                recorder.offsets.append(offset)
                # An offset confirms every update before it: Telegram forgets them.
                recorder.updates = [u for u in recorder.updates if u["update_id"] >= offset]
                while not recorder.updates and time.monotonic() < deadline:
                    recorder.lock.wait(deadline - time.monotonic())
                result = list(recorder.updates)
            self._json(200, {"ok": True, "result": result})

        def _file(self, file_id: str) -> None:
            with recorder.lock:
                recorder.file_requests.append(file_id)
                found = recorder.files.get(file_id)
            if found is None:
                self._error(400, "Bad Request: invalid file_id")
                return
            path, data = found
            self._json(200, {"ok": True, "result": {"file_id": file_id, "file_path": path,
                                                    "file_size": len(data)}})  # fmt: skip

    return Handler


@contextlib.contextmanager
def running_recorder() -> Iterator[TelegramRecorder]:
    """A recorder serving on a free loopback port until leaving (tests and benchmarks)."""
    recorder = TelegramRecorder(token=f"{secrets.randbelow(10**9)}:{secrets.token_urlsafe(26)}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder))
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield recorder
    finally:
        recorder.release.set()
        with recorder.lock:
            recorder.lock.notify_all()
        server.shutdown()
