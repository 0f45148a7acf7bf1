"""Real mail servers for the email tests: Debian's dovecot (IMAP) and aiosmtpd (SMTP).

Dovecot runs on a free loopback port with a throwaway configuration and one
virtual user whose mail belongs to ``nobody`` (dovecot refuses to run mail
processes as root). The SMTP server records every message it accepts and can
be told to answer the next ones with a temporary failure.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from imap_tools import MailBoxUnencrypted

from gpt4people.redis_server import free_port
from tests.conftest import wait_for

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
MAIL_UID = 65534  # nobody

DOVECOT_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
default_login_user = dovenull
default_internal_user = dovecot
mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


@dataclass
class Dovecot:
    """A running dovecot with one mailbox."""

    port: int
    user: str = "bot"
    password: str = "imap-secret-7"

    def mailbox(self) -> MailBoxUnencrypted:
        """A logged-in IMAP client on INBOX."""
        return MailBoxUnencrypted("127.0.0.1", self.port, timeout=10).login(
            self.user, self.password
        )

    def append(self, raw: bytes) -> None:
        """Deliver `raw` into INBOX, as a mail server would."""
        with self.mailbox() as box:
            box.append(raw, "INBOX")

    def flags(self, message_id: str) -> set[str]:
        """The IMAP flags of the mail with this Message-ID."""
        with self.mailbox() as box:
            for mail in box.fetch(mark_seen=False, headers_only=True):
                if message_id in mail.headers.get("message-id", ("",))[0]:
                    return set(mail.flags)
        raise AssertionError(f"no mail {message_id}")


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """Debian's dovecot on a free loopback port (installed by `make install`)."""
    with running_dovecot() as server:
        yield server


@contextlib.contextmanager
def running_dovecot() -> Iterator[Dovecot]:
    """Dovecot with a throwaway configuration, stopped on leaving (tests and benchmarks)."""
    if not Path(DOVECOT).exists():
        raise RuntimeError("dovecot is not installed: run `make install` (apt dovecot-imapd)")
    root = Path(tempfile.mkdtemp(prefix="gpt4p-dovecot-"))
    root.chmod(0o755)  # mail processes run as nobody and must reach the mail folder
    for name in ("run", "state", "mail"):
        (root / name).mkdir()
    server = Dovecot(port=free_port())
    (root / "users").write_text(
        f"{server.user}:{{PLAIN}}{server.password}:{MAIL_UID}:{MAIL_UID}::{root}/mail/{server.user}\n"
    )
    shutil.chown(root / "mail", MAIL_UID, MAIL_UID)
    (root / "dovecot.conf").write_text(DOVECOT_CONF.format(root=root, port=server.port))
    process = subprocess.Popen(
        [DOVECOT, "-F", "-c", str(root / "dovecot.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def ready() -> bool:
        with server.mailbox():
            return True

    try:
        wait_for(ready, 30, "dovecot to accept a login", every=0.1)
        yield server
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class SmtpCapture:
    """What the SMTP server accepted, and scripted temporary failures."""

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[EmailMessage] = field(default_factory=list)
    refused: int = 0
    fail_next: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                self.refused += 1
                return "451 4.3.0 Temporary failure, try again later"
            message = message_from_bytes(envelope.content, policy=policy.default)
            message["X-Envelope-To"] = ",".join(envelope.rcpt_tos)
            self.messages.append(message)  # type: ignore[arg-type]
        return "250 2.0.0 OK"

    def sent_to(self, address: str) -> list[EmailMessage]:
        """Mail accepted for `address`."""
        with self.lock:
            return [m for m in self.messages if address in m["X-Envelope-To"].split(",")]


@pytest.fixture(scope="session")
def smtp() -> Iterator[SmtpCapture]:
    """A real SMTP server (aiosmtpd) on a free loopback port."""
    with running_smtp() as capture:
        yield capture


@contextlib.contextmanager
def running_smtp() -> Iterator[SmtpCapture]:
    """An SMTP server recording what it accepts, stopped on leaving (tests and benchmarks)."""
    capture = SmtpCapture(port=free_port())
    controller = Controller(capture, hostname=capture.host, port=capture.port)
    controller.start()
    try:
        yield capture
    finally:
        controller.stop()
