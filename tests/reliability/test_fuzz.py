"""Junk at every entry point: no 5xx and no exception escaping, whatever arrives.

Hypothesis generates bodies for the two HTTP entry points (served by the real
app in-process, with a real Redis behind it) and raw bytes for the email parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imap_tools import MailMessage
from twilio.request_validator import RequestValidator

from channels.email.parse import UnreadableMailError, read_mail, skip_reason
from channels.web import create_app
from gpt4people.redis_server import RedisServer
from kernel.settings import Settings
from tests.conftest import DB_NO_WORKER, redis_url

ACCOUNT, TOKEN = "AC" + "3" * 32, "fuzz-token"
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "", "wizard"]),
     "content": json_value},
)  # fmt: skip
chat_body = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=4)},
        optional={"model": json_value, "max_tokens": json_value, "temperature": json_value,
                  "stream": json_value, "stop": json_value, "n": json_value,
                  "seed": json_value, "top_p": json_value},
    ),
)  # fmt: skip
sms_form = st.dictionaries(
    st.sampled_from(["MessageSid", "AccountSid", "From", "To", "Body", "NumMedia", "MediaUrl0",
                     "MediaContentType0", "Junk"]),
    text, max_size=9,
)  # fmt: skip


@pytest.fixture(scope="module")
def web(redis_server: RedisServer) -> Iterator[TestClient]:
    # No worker consumes this database: jobs are accepted and wait; answers time out fast.
    app_settings = Settings(
        redis_url=redis_url(redis_server, DB_NO_WORKER), engine="echo", job_timeout=0.5,
        twilio_account_sid=ACCOUNT, twilio_auth_token=TOKEN,
    )  # type: ignore[arg-type]  # fmt: skip
    with TestClient(create_app(app_settings), raise_server_exceptions=True) as client:
        yield client


@FUZZ
@given(body=chat_body)
def test_chat_completions_never_answer_5xx_to_junk(web: TestClient, body: object) -> None:
    response = web.post("/v1/chat/completions", content=json.dumps(body),
                        headers={"content-type": "application/json"})  # fmt: skip
    # 504: a valid request that no worker answered in time (none runs here); never a 500.
    assert response.status_code in {200, 400, 413, 504}, response.text
    assert "error" in response.json() or response.status_code == 200


@FUZZ
@given(raw=st.binary(max_size=400))
def test_chat_completions_survive_raw_bytes(web: TestClient, raw: bytes) -> None:
    response = web.post("/v1/chat/completions", content=raw,
                        headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code in {400, 413, 504}


@FUZZ
@given(form=sms_form, signed=st.booleans())
def test_sms_webhook_never_answers_5xx(web: TestClient, form: dict[str, str], signed: bool) -> None:
    form = {**form, "AccountSid": ACCOUNT} if signed else form
    headers = {}
    if signed:
        headers["X-Twilio-Signature"] = RequestValidator(TOKEN).compute_signature(
            "http://testserver/sms", form
        )
    response = web.post("/sms", data=form, headers=headers)
    assert response.status_code in {200, 400, 403}, response.text
    if not signed:
        assert response.status_code == 403


@FUZZ
@given(raw=st.binary(max_size=2000))
def test_the_email_parser_never_raises_anything_but_unreadable(raw: bytes) -> None:
    mail = MailMessage.from_bytes(raw)
    try:
        read_mail(mail, Settings())
    except UnreadableMailError:
        return
    skip_reason(mail, Settings(email_allow="@example.org"))


@FUZZ
@given(headers=st.lists(st.tuples(st.sampled_from(["From", "Subject", "Message-ID", "References",
                                                    "Reply-To", "Content-Type", "Auto-Submitted",
                                                    "Content-Transfer-Encoding"]),
                                  text), max_size=8),
       body=text)  # fmt: skip
def test_the_email_parser_handles_any_headers(headers: list[tuple[str, str]], body: str) -> None:
    lines = [
        f"{name}: {value.replace(chr(13), ' ').replace(chr(10), ' ')}" for name, value in headers
    ]
    raw = ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8", "surrogatepass")
    mail = MailMessage.from_bytes(raw)
    try:
        read_mail(mail, Settings())
    except UnreadableMailError:
        return
