"""Behind a proxy, the signature is checked against GPT4P_PUBLIC_URL, the URL Twilio called."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from twilio.request_validator import RequestValidator

from channels.web import create_app
from tests.channels.twilio_recorder import TwilioRecorder
from tests.conftest import DB_SMS_PROXY, redis_url
from workers.redis_server import RedisServer
from workers.settings import Settings


@pytest.fixture
def web(redis_server: RedisServer, twilio: TwilioRecorder) -> TestClient:
    settings = Settings(
        redis_url=redis_url(redis_server, DB_SMS_PROXY), engine="echo",
        twilio_account_sid=twilio.account_sid, twilio_auth_token=twilio.auth_token,
        public_url="https://bot.example.com/",
    )  # type: ignore[arg-type]  # fmt: skip
    return TestClient(create_app(settings))


def post_signed(web: TestClient, twilio: TwilioRecorder, signed_url: str) -> int:
    params = {"MessageSid": "SM" + uuid.uuid4().hex, "AccountSid": twilio.account_sid,
              "From": "+15559990000", "To": "+15550000000", "Body": "hi",
              "NumMedia": "0"}  # fmt: skip
    signature = RequestValidator(twilio.auth_token).compute_signature(signed_url, params)
    with web:
        response = web.post("/sms", data=params, headers={"X-Twilio-Signature": signature})
    return response.status_code


def test_a_webhook_signed_for_the_public_url_is_accepted(
    web: TestClient, twilio: TwilioRecorder
) -> None:
    assert post_signed(web, twilio, "https://bot.example.com/sms") == 200


def test_a_webhook_signed_for_the_internal_url_is_refused(
    web: TestClient, twilio: TwilioRecorder
) -> None:
    assert post_signed(web, twilio, "http://testserver/sms") == 403


def test_sms_without_twilio_settings_is_503_naming_nothing_secret(
    redis_server: RedisServer,
) -> None:
    settings = Settings(redis_url=redis_url(redis_server, DB_SMS_PROXY), engine="echo")
    with TestClient(create_app(settings)) as web:
        response = web.post("/sms", data={"Body": "hi"})
    assert response.status_code == 503
