"""Fixtures for the channel tests: the Twilio recorder and the SMS stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.channels.twilio_recorder import TwilioRecorder, twilio
from tests.conftest import DB_SMS, base_env, redis_url, start_web, start_worker, stop_process
from workers.redis_server import RedisServer, free_port

__all__ = ["twilio"]

SMS_RATE_LIMIT = 5


@pytest.fixture(scope="session")
def sms_env(redis_server: RedisServer, state_dir: Path, twilio: TwilioRecorder) -> dict[str, str]:
    """Settings of the SMS stack: echo engine, Twilio pointed at the recorder."""
    return base_env(
        state_dir,
        redis_url=redis_url(redis_server, DB_SMS),
        engine="echo",
        twilio_account_sid=twilio.account_sid,
        twilio_auth_token=twilio.auth_token,
        twilio_from="+15550000000",
        twilio_api_base=twilio.url,
        sms_retry_backoff="0.1",
        sms_rate_limit=str(SMS_RATE_LIMIT),
        sms_max_inbound_chars="8000",
        sms_max_tokens="4096",
        max_prompt_chars="100000",
    )


@pytest.fixture(scope="session")
def sms_web(sms_env: dict[str, str]) -> Iterator[str]:
    """The web app, an echo inference worker and a delivery worker; yields the base URL."""
    inference = start_worker(sms_env, "sms-echo@test")
    deliver = start_worker(sms_env, "deliver@test", command="deliver")
    port = free_port()
    web = start_web(sms_env, port)
    yield f"http://127.0.0.1:{port}"
    for process in (web, deliver, inference):
        stop_process(process)
