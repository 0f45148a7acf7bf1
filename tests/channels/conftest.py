"""Fixtures for the channel tests: the Twilio recorder and the SMS stack."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpt4people.redis_server import RedisServer, free_port
from tests.channels.mail_servers import Dovecot, SmtpCapture, dovecot, smtp
from tests.channels.twilio_recorder import TwilioRecorder, twilio
from tests.conftest import (
    DB_EMAIL,
    DB_SMS,
    ROOT,
    base_env,
    redis_url,
    start_web,
    start_worker,
    stop_process,
)

__all__ = ["dovecot", "smtp", "twilio"]
EMAIL_FROM = "bot@gpt4people.test"
EMAIL_AUTHSERV_ID = "mx.gpt4people.test"  # our receiving server, as the tests play it
EMAIL_RATE_LIMIT = 3

SMS_RATE_LIMIT = 5


@pytest.fixture(scope="session")
def sms_env(redis_server: RedisServer, state_dir: Path, twilio: TwilioRecorder) -> dict[str, str]:
    """Settings of the SMS stack: echo engine, Twilio pointed at the recorder."""
    return base_env(
        state_dir,
        redis_url=redis_url(redis_server, DB_SMS),
        engine="echo",
        **twilio.settings(),
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


@pytest.fixture(scope="session")
def email_env(
    redis_server: RedisServer, state_dir: Path, dovecot: Dovecot, smtp: SmtpCapture
) -> dict[str, str]:
    """Settings of the email stack: dovecot in, aiosmtpd out, the echo engine."""
    return base_env(
        state_dir,
        redis_url=redis_url(redis_server, DB_EMAIL),
        engine="echo",
        imap_host="127.0.0.1",
        imap_port=str(dovecot.port),
        imap_user=dovecot.user,
        imap_password=dovecot.password,
        imap_ssl="plain",
        email_poll_seconds="1",
        smtp_host=smtp.host,
        smtp_port=str(smtp.port),
        smtp_starttls="false",
        email_from=EMAIL_FROM,
        email_retry_backoff="0.1",
        email_rate_limit=str(EMAIL_RATE_LIMIT),
        email_authserv_id=EMAIL_AUTHSERV_ID,
    )


def start_poller(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `gpt4people email` (it logs to the state folder)."""
    log = open(Path(env["GPT4P_STATE_DIR"]) / "email-poller.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "gpt4people.cli", "email"], env=env, cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


@contextlib.contextmanager
def running_email_stack(
    env: dict[str, str], name: str
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """An echo inference worker and a delivery worker (NAME-echo@test, NAME-deliver@test)
    and the mailbox poller, stopped on leaving."""
    processes = {
        "inference": start_worker(env, f"{name}-echo@test"),
        "deliver": start_worker(env, f"{name}-deliver@test", command="deliver"),
        "poller": start_poller(env),
    }
    try:
        yield processes
    finally:
        for process in processes.values():
            stop_process(process)


@pytest.fixture(scope="session")
def email_stack(email_env: dict[str, str]) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """An echo inference worker, a delivery worker and the mailbox poller."""
    with running_email_stack(email_env, "email") as processes:
        yield processes
