"""A local stand-in for the part of Twilio's REST API our client uses, recording every call.

Twilio's API is the one remote paid service the tests cannot reach; the
delivery worker's real twilio client is pointed here with GPT4P_TWILIO_API_BASE.
It speaks the same protocol (form-encoded POST to
``/2010-04-01/Accounts/{AccountSid}/Messages.json``, basic auth, JSON answers
and Twilio's error bodies) and can be told to fail for a recipient.
`TwilioRecorder.webhook` is the other direction: the signed form Twilio posts
to our webhook when somebody texts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from twilio.request_validator import RequestValidator

OUR_NUMBER = "+15550000000"  # the Twilio number people text, in every test


@dataclass
class Call:
    """One request the client made."""

    account: str
    form: dict[str, str]
    status: int


@dataclass
class TwilioRecorder:
    """What Twilio would have received, and scripted failures per recipient."""

    account_sid: str
    auth_token: str
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, list[tuple[int, int | None]]] = field(default_factory=dict)
    media: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    fetches: list[str] = field(default_factory=list)
    # Recipients whose next message is accepted and then left unanswered (a hang).
    hang_after_accept: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    sids: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def settings(self) -> dict[str, str]:
        """The `base_env` settings of a process that texts through this recorder as OUR_NUMBER."""
        return {"twilio_account_sid": self.account_sid, "twilio_auth_token": self.auth_token,
                "twilio_from": OUR_NUMBER, "twilio_api_base": self.url}  # fmt: skip

    def fail(self, to: str, *answers: tuple[int, int | None]) -> None:
        """Answer the next sends to `to` with these (HTTP status, Twilio error code)s."""
        with self.lock:
            self.failures[to] = list(answers)

    def delivered(self, to: str) -> list[str]:
        """Bodies Twilio accepted for `to`, in order."""
        with self.lock:
            return [
                c.form["Body"] for c in self.calls if c.form.get("To") == to and c.status == 201
            ]

    def webhook(
        self, url: str, sender: str, body: str, sid: str | None = None, **extra: str
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The form and headers Twilio posts to the webhook at `url` when `sender` texts
        `body` to our number, signed with this account's token."""
        params = {"MessageSid": sid or "SM" + uuid.uuid4().hex, "AccountSid": self.account_sid,
                  "From": sender, "To": OUR_NUMBER, "Body": body, "NumMedia": "0",
                  **extra}  # fmt: skip
        signature = RequestValidator(self.auth_token).compute_signature(url, params)
        return params, {"X-Twilio-Signature": signature}

    def attempts(self, to: str) -> list[Call]:
        """Every send attempted to `to`."""
        with self.lock:
            return [c for c in self.calls if c.form.get("To") == to]


def _handler(recorder: TwilioRecorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def _authorized(self) -> bool:
            expected = f"{recorder.account_sid}:{recorder.auth_token}".encode()
            given = self.headers.get("Authorization", "")
            return given == "Basic " + base64.b64encode(expected).decode()

        def _json(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            parts = self.path.split("/")
            account = parts[3] if len(parts) > 3 else ""
            if not self._authorized() or not self.path.endswith("/Messages.json"):
                self._json(401, {"code": 20003, "message": "Authenticate", "status": 401})
                return
            with recorder.lock:
                scripted = recorder.failures.get(form.get("To", ""), [])
                status, code = scripted.pop(0) if scripted else (201, None)
                recorder.calls.append(Call(account, form, status))
                sid = recorder.sids[len(recorder.calls) - 1] = "SM" + uuid.uuid4().hex
                hang = form.get("To", "") in recorder.hang_after_accept
                recorder.hang_after_accept.discard(form.get("To", ""))
            if hang:  # accepted (recorded) but the answer never comes in time
                recorder.release.wait(60)
                return
            if status != 201:
                error = {"code": code, "message": "scripted failure", "status": status}
                self._json(status, error)
                return
            self._json(201, {
                "sid": sid, "account_sid": account, "to": form.get("To"),
                "from": form.get("From"), "body": form.get("Body"), "status": "queued",
                "messaging_service_sid": form.get("MessagingServiceSid"), "num_segments": "1",
            })  # fmt: skip

        def _message_log(self) -> None:
            query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
            with recorder.lock:
                listed = [
                    {"sid": recorder.sids[i], "to": c.form.get("To"), "from": c.form.get("From"),
                     "body": c.form.get("Body"), "status": "sent", "account_sid": c.account}
                    for i, c in enumerate(recorder.calls)
                    if c.status == 201 and c.form.get("To") == query.get("To", c.form.get("To"))
                ]  # fmt: skip
            page = {"page": 0, "page_size": 100, "start": 0, "end": len(listed),
                    "first_page_uri": self.path, "next_page_uri": None,
                    "previous_page_uri": None, "uri": self.path}  # fmt: skip
            self._json(200, {"messages": listed, **page})

        def do_GET(self) -> None:
            if urlparse(self.path).path.endswith("/Messages.json"):
                if not self._authorized():
                    self._json(401, {"code": 20003, "message": "Authenticate", "status": 401})
                    return
                self._message_log()
                return
            name = self.path.rsplit("/", 1)[-1]
            with recorder.lock:
                recorder.fetches.append(name)
            if not self._authorized():
                self._json(401, {"code": 20003, "message": "Authenticate", "status": 401})
                return
            if name not in recorder.media:
                self._json(404, {"code": 20404, "message": "not found", "status": 404})
                return
            data, content_type = recorder.media[name]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture(scope="session")
def twilio() -> Iterator[TwilioRecorder]:
    """A running recorder; its `url` is what GPT4P_TWILIO_API_BASE points at."""
    with running_recorder("AC" + "1" * 32, "test-auth-token-123") as recorder:
        yield recorder


@contextlib.contextmanager
def running_recorder(account_sid: str, auth_token: str) -> Iterator[TwilioRecorder]:
    """A recorder serving on a free loopback port until leaving (tests and benchmarks)."""
    recorder = TwilioRecorder(account_sid=account_sid, auth_token=auth_token)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder))
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield recorder
    finally:
        server.shutdown()
