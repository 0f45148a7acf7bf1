"""Behind a proxy, the signature is checked against GPT4P_PUBLIC_URL, the URL Twilio called."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from channels.web import create_app
from gpt4people.redis_server import RedisServer
from kernel.settings import Settings
from tests.channels.twilio_recorder import TwilioRecorder
from tests.conftest import DB_SMS_PROXY, redis_url


@pytest.fixture
def web(redis_server: RedisServer, twilio: TwilioRecorder) -> TestClient:
    settings = Settings(
        redis_url=redis_url(redis_server, DB_SMS_PROXY), engine="echo",
        twilio_account_sid=twilio.account_sid, twilio_auth_token=twilio.auth_token,
        public_url="https://bot.example.com/",
    )  # type: ignore[arg-type]  # fmt: skip
    return TestClient(create_app(settings))


def post_signed(web: TestClient, twilio: TwilioRecorder, signed_url: str) -> int:
    params, headers = twilio.webhook(signed_url, "+15559990000", "hi")
    with web:
        response = web.post("/sms", data=params, headers=headers)
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
